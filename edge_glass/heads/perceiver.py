"""Perceiver resampler: K learned latents cross-attend to a token sequence.

(B, T, D_in) + mask (B, T) -> (B, K, dim). As in Flamingo, each layer's latents attend to the
concatenation [inputs; latents], then pass an MLP; both with pre-LayerNorm residuals. Used as a
pooler (latents averaged -> (B, dim)) and, for decoders, as a fixed-length visual/audio prefix.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..encoders.base import EncoderOutput
from .pooling import POOLERS, MeanSkip, Pooler, PoolerConfig


class PerceiverConfig(PoolerConfig):
    type: Literal["perceiver"] = "perceiver"
    dim: int = Field(512, ge=8)
    latents: int = Field(32, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(8, ge=1)
    ff_mult: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    residual: bool = Field(False, description="add a gated mean-pooling skip path (starts as the linear baseline)")


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * ff_mult, dim)
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim), latents (B, K, dim), pad (B, T + K) True = ignore -> (B, K, dim)."""
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_x(x), q], dim=1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """(B, T, D_in), mask (B, T) -> (B, K, dim)."""

    def __init__(self, in_dim: int, dim: int, latents: int, depth: int, heads: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"perceiver: dim {dim} is not divisible by heads {heads}")
        self.proj_in = nn.Linear(in_dim, dim)
        self.latents = nn.Parameter(torch.randn(latents, dim) * dim**-0.5)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, ff_mult, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens)
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        pad = torch.cat([~mask, mask.new_zeros(mask.shape[0], lat.shape[1])], dim=1)
        for layer in self.layers:
            lat = layer(x, lat, pad)
        return self.norm_out(lat)


@POOLERS.register("perceiver")
class PerceiverPooler(Pooler):
    Config = PerceiverConfig

    def __init__(self, cfg: PerceiverConfig, in_dim: int):
        super().__init__()
        self.out_dim, self.token_dropout = cfg.dim, cfg.token_dropout
        self.resampler = PerceiverResampler(in_dim, cfg.dim, cfg.latents, cfg.depth, cfg.heads, cfg.ff_mult, cfg.dropout)
        self.residual = MeanSkip(in_dim, cfg.dim) if cfg.residual else None

    def pool(self, x: EncoderOutput) -> torch.Tensor:
        out = self.resampler(x.tokens, x.mask).mean(1)
        return self.residual(x, out) if self.residual is not None else out
