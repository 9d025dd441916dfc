"""Poolers: a token sequence (B, T, D_in) + mask (B, T) -> one vector (B, out_dim).

mean       masked average of the tokens (no parameters; with a linear projection this is the
           "plain linear head" baseline)
pooled     the backbone's own pooled vector (CLS / sentence embedding / global average)
attention  learned queries cross-attend to the tokens (multi-head), averaged over queries
perceiver  see perceiver.py: latents cross-attend to the tokens, then averaged
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..encoders.base import EncoderOutput
from ..registry import Registry
from ..tensors import masked_mean

POOLERS = Registry("pooler")


class PoolerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_dropout: float = Field(0.0, ge=0, lt=1, description="training only: hide each token with this probability")


class Pooler(nn.Module, ABC):
    """Subclasses implement ``pool``; ``forward`` adds token dropout while training."""

    Config: ClassVar[type[PoolerConfig]]
    out_dim: int
    token_dropout: float = 0.0

    def forward(self, x: EncoderOutput) -> torch.Tensor:  # (B, out_dim)
        return self.pool(drop_tokens(x, self.token_dropout) if self.training else x)

    @abstractmethod
    def pool(self, x: EncoderOutput) -> torch.Tensor:
        ...


class MeanSkip(nn.Module):
    """Gated residual around a learned pooler: out = W mean(tokens) + tanh(g) pooled, g = 0 at
    init, so the pooler starts as the linear baseline and adds attention only as it helps."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.skip = nn.Linear(in_dim, out_dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: EncoderOutput, pooled: torch.Tensor) -> torch.Tensor:
        return self.skip(masked_mean(x.tokens, x.mask)) + torch.tanh(self.gate) * pooled


def drop_tokens(x: EncoderOutput, p: float) -> EncoderOutput:
    """Hide each real token with probability p (a set-input regulariser; at least one stays)."""
    if p <= 0:
        return x
    keep = (torch.rand(x.mask.shape, device=x.mask.device) >= p) & x.mask
    none_left = ~keep.any(1)
    keep[none_left] = x.mask[none_left]
    return EncoderOutput(x.tokens, keep, x.pooled)


class MeanConfig(PoolerConfig):
    type: Literal["mean"] = "mean"


@POOLERS.register("mean")
class MeanPooler(Pooler):
    Config = MeanConfig

    def __init__(self, cfg: MeanConfig, in_dim: int):
        super().__init__()
        self.out_dim, self.token_dropout = in_dim, cfg.token_dropout

    def pool(self, x: EncoderOutput) -> torch.Tensor:
        return masked_mean(x.tokens, x.mask)


class PooledConfig(PoolerConfig):
    type: Literal["pooled"] = "pooled"


@POOLERS.register("pooled")
class BackbonePooled(Pooler):
    Config = PooledConfig

    def __init__(self, cfg: PooledConfig, in_dim: int):
        super().__init__()
        self.out_dim = in_dim

    def pool(self, x: EncoderOutput) -> torch.Tensor:
        return x.pooled


class AttentionConfig(PoolerConfig):
    type: Literal["attention"] = "attention"
    dim: int = Field(512, ge=8, description="width of queries and output")
    heads: int = Field(8, ge=1)
    queries: int = Field(1, ge=1, description="learned queries, averaged into one vector")
    dropout: float = Field(0.0, ge=0, lt=1)
    residual: bool = Field(False, description="add a gated mean-pooling skip path (starts as the linear baseline)")


@POOLERS.register("attention")
class AttentionPooler(Pooler):
    """Learned queries (Q, dim) attend over LayerNorm(tokens): (B, T, D_in) -> (B, dim)."""

    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, in_dim: int):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"attention pooler: dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.out_dim, self.token_dropout = cfg.dim, cfg.token_dropout
        self.norm_in = nn.LayerNorm(in_dim)
        # near-zero queries attend almost uniformly: the pooler starts as a (projected) mean of the
        # tokens, the linear baseline, and learns where to focus
        self.query = nn.Parameter(torch.randn(cfg.queries, cfg.dim) * 0.02)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, kdim=in_dim, vdim=in_dim, batch_first=True)
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.residual = MeanSkip(in_dim, cfg.dim) if cfg.residual else None

    def pool(self, x: EncoderOutput) -> torch.Tensor:
        kv = self.norm_in(x.tokens)
        q = self.query.unsqueeze(0).expand(kv.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, key_padding_mask=~x.mask, need_weights=False)
        out = self.norm_out(out.mean(1))
        return self.residual(x, out) if self.residual is not None else out
