"""AlignmentModel: per-modality heads (pooler -> Matryoshka projection) + learnable temperatures.

It sees frozen-encoder outputs, never raw inputs, so it trains the same from cached features or
live encoding:  {modality: EncoderOutput} -> {modality: {dim: (B, dim) unit vectors}}.
"""
from __future__ import annotations

import math
from itertools import combinations

import torch
from torch import nn

from ..encoders.base import EncoderOutput
from ..heads import POOLERS, MatryoshkaProjection


def pair_name(a: str, b: str) -> str:
    return f"{a}__{b}"


class ModalityHead(nn.Module):
    """(B, T, D_in) tokens -> pooler -> (B, P) -> Matryoshka projection -> {d: (B, d)}."""

    def __init__(self, head_cfg, token_dim: int, dims: list[int]):
        super().__init__()
        self.pooler = POOLERS.build(head_cfg.pooler, token_dim)
        self.projection = MatryoshkaProjection(self.pooler.out_dim, dims, head_cfg.projection)

    def forward(self, x: EncoderOutput) -> dict[int, torch.Tensor]:
        return self.projection(self.pooler(x))

    def at_dim(self, x: EncoderOutput, dim: int) -> torch.Tensor:
        return self.projection.at_dim(self.pooler(x), dim)


class AlignmentModel(nn.Module):
    def __init__(self, model_cfg, loss_cfg, token_dims: dict[str, int]):
        super().__init__()
        self.dims = sorted(model_cfg.dims, reverse=True)
        self.heads = nn.ModuleDict(
            {m: ModalityHead(model_cfg.heads[m], token_dims[m], self.dims) for m in sorted(token_dims)}
        )
        t = loss_cfg.temperature
        self.scale_bounds = (math.log(1 / t.max), math.log(1 / t.min))
        self.pairs = [tuple(p.split("-")) for p in loss_cfg.pairs] if loss_cfg.pairs else list(combinations(sorted(token_dims), 2))
        self.logit_scales = nn.ParameterDict(
            {pair_name(a, b): nn.Parameter(torch.tensor(math.log(1 / t.init)), requires_grad=t.learnable) for a, b in self.pairs}
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.heads)

    def embed(self, modality: str, x: EncoderOutput) -> dict[int, torch.Tensor]:
        return self.heads[modality](x)

    def forward(self, features: dict[str, EncoderOutput]) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, torch.Tensor]]:
        """Embeddings of every modality present, and exp(logit scale) of every pair."""
        emb = {m: self.heads[m](x) for m, x in features.items()}
        scales = {k: v.exp() for k, v in self.logit_scales.items()}
        return emb, scales

    @torch.no_grad()
    def clamp_scales(self) -> None:
        lo, hi = self.scale_bounds
        for p in self.logit_scales.values():
            p.clamp_(lo, hi)
