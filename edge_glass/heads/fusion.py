"""Fusion: two modalities' token sequences -> one vector, e.g. an image + a spoken question as
one query that retrieves text.

    fusion(a: EncoderOutput (B, Ta, Da) + mask, b: EncoderOutput (B, Tb, Db) + mask) -> (B, dim)

Every fusion first maps each input to a common width ``dim`` (LayerNorm + Linear per token);
padded tokens never contribute. Registered types (``model.fusion.type``):

concat           masked mean of each sequence, concatenated, then a 2-layer MLP
cross_attention  each sequence attends to the other (one pre-LN block per direction, with an
                 MLP), then both are mean-pooled, concatenated and projected
gated            masked means of each, mixed per feature by a learned sigmoid gate
                 g([a; b]) * a + (1 - g) * b
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..encoders.base import EncoderOutput
from ..registry import Registry
from .matryoshka import ProjectionConfig
from ..tensors import masked_mean

FUSIONS = Registry("fusion")


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: tuple[str, str] = Field(("image", "audio"), description="the two modalities fused, in order")
    dim: int = Field(256, ge=8, description="common width of both inputs and of the fused vector")
    dropout: float = Field(0.0, ge=0, lt=1)
    projection: ProjectionConfig = ProjectionConfig()

    @field_validator("inputs")
    @classmethod
    def _distinct(cls, v: tuple[str, str]) -> tuple[str, str]:
        if v[0] == v[1]:
            raise ValueError("fusion needs two different modalities")
        return v

    @property
    def name(self) -> str:
        """The fused input's name in losses and results: "image+audio"."""
        return "+".join(self.inputs)


class Fusion(nn.Module, ABC):
    Config: ClassVar[type[FusionConfig]]
    out_dim: int

    def __init__(self, cfg: FusionConfig, in_dims: tuple[int, int]):
        super().__init__()
        self.out_dim = cfg.dim
        self.proj_a = nn.Sequential(nn.LayerNorm(in_dims[0]), nn.Linear(in_dims[0], cfg.dim))
        self.proj_b = nn.Sequential(nn.LayerNorm(in_dims[1]), nn.Linear(in_dims[1], cfg.dim))

    @abstractmethod
    def forward(self, a: EncoderOutput, b: EncoderOutput) -> torch.Tensor:  # (B, out_dim)
        ...


class ConcatConfig(FusionConfig):
    type: Literal["concat"] = "concat"
    hidden: int = Field(512, ge=8)


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """[mean(a); mean(b)] (B, 2 dim) -> MLP -> (B, dim)."""

    Config = ConcatConfig

    def __init__(self, cfg: ConcatConfig, in_dims: tuple[int, int]):
        super().__init__(cfg, in_dims)
        self.mlp = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(self, a: EncoderOutput, b: EncoderOutput) -> torch.Tensor:
        pa, pb = masked_mean(self.proj_a(a.tokens), a.mask), masked_mean(self.proj_b(b.tokens), b.mask)
        return self.mlp(torch.cat([pa, pb], dim=-1))


class CrossAttentionConfig(FusionConfig):
    type: Literal["cross_attention"] = "cross_attention"
    heads: int = Field(4, ge=1)
    ff_mult: int = Field(2, ge=1)


class CrossBlock(nn.Module):
    """Queries (B, Tq, dim) attend to keys (B, Tk, dim) with key mask (B, Tk) -> (B, Tq, dim)."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_k = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, k_mask: torch.Tensor) -> torch.Tensor:
        kv = self.norm_k(k)
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=~k_mask, need_weights=False)[0]
        return q + self.ff(q)


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(Fusion):
    """a attends to b and b to a; [mean(a'); mean(b')] -> Linear -> (B, dim)."""

    Config = CrossAttentionConfig

    def __init__(self, cfg: CrossAttentionConfig, in_dims: tuple[int, int]):
        super().__init__(cfg, in_dims)
        if cfg.dim % cfg.heads:
            raise ValueError(f"cross_attention fusion: dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.a_to_b = CrossBlock(cfg.dim, cfg.heads, cfg.ff_mult, cfg.dropout)
        self.b_to_a = CrossBlock(cfg.dim, cfg.heads, cfg.ff_mult, cfg.dropout)
        self.out = nn.Sequential(nn.LayerNorm(2 * cfg.dim), nn.Linear(2 * cfg.dim, cfg.dim))

    def forward(self, a: EncoderOutput, b: EncoderOutput) -> torch.Tensor:
        xa, xb = self.proj_a(a.tokens), self.proj_b(b.tokens)
        ya, yb = self.a_to_b(xa, xb, b.mask), self.b_to_a(xb, xa, a.mask)
        return self.out(torch.cat([masked_mean(ya, a.mask), masked_mean(yb, b.mask)], dim=-1))


class GatedConfig(FusionConfig):
    type: Literal["gated"] = "gated"


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """g = sigmoid(W [pa; pb]) (B, dim); g * pa + (1 - g) * pb -> LayerNorm -> (B, dim)."""

    Config = GatedConfig

    def __init__(self, cfg: GatedConfig, in_dims: tuple[int, int]):
        super().__init__(cfg, in_dims)
        self.gate = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.dim, cfg.dim))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, a: EncoderOutput, b: EncoderOutput) -> torch.Tensor:
        pa, pb = masked_mean(self.proj_a(a.tokens), a.mask), masked_mean(self.proj_b(b.tokens), b.mask)
        g = torch.sigmoid(self.gate(torch.cat([pa, pb], dim=-1)))
        return self.norm(g * pa + (1 - g) * pb)
