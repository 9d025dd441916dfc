"""AlignmentModel: per-modality heads (pooler -> Matryoshka projection) + learnable temperatures,
and optionally a fusion head that embeds two modalities together (e.g. "image+audio").

It sees frozen-encoder outputs, never raw inputs, so it trains the same from cached features or
live encoding:  {modality: EncoderOutput} -> {modality: {dim: (B, dim) unit vectors}}.
"""
from __future__ import annotations

import math
from itertools import combinations

import torch
from torch import nn

from ..encoders.base import EncoderOutput
from ..heads import FUSIONS, POOLERS, MatryoshkaProjection


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


class FusionHead(nn.Module):
    """Two token sequences (B, Ta, Da), (B, Tb, Db) -> fusion -> (B, F) -> Matryoshka projection -> {d: (B, d)}."""

    def __init__(self, fusion_cfg, token_dims: tuple[int, int], dims: list[int]):
        super().__init__()
        self.fusion = FUSIONS.build(fusion_cfg, token_dims)
        self.projection = MatryoshkaProjection(self.fusion.out_dim, dims, fusion_cfg.projection)

    def forward(self, a: EncoderOutput, b: EncoderOutput) -> dict[int, torch.Tensor]:
        return self.projection(self.fusion(a, b))

    def at_dim(self, a: EncoderOutput, b: EncoderOutput, dim: int) -> torch.Tensor:
        return self.projection.at_dim(self.fusion(a, b), dim)


def rows_of(x: EncoderOutput, has: torch.Tensor, want: torch.Tensor) -> EncoderOutput:
    """x holds the rows of a batch where ``has`` (B,) is True; return those where ``want`` is (want implies has)."""
    idx = (has.long().cumsum(0) - 1)[want]
    return EncoderOutput(x.tokens[idx], x.mask[idx], x.pooled[idx])


class AlignmentModel(nn.Module):
    def __init__(self, model_cfg, loss_cfg, token_dims: dict[str, int]):
        super().__init__()
        self.dims = sorted(model_cfg.dims, reverse=True)
        self.heads = nn.ModuleDict(
            {m: ModalityHead(model_cfg.heads[m], token_dims[m], self.dims) for m in sorted(token_dims)}
        )
        fusion = model_cfg.fusion
        self.fused: dict[str, tuple[str, str]] = {fusion.name: tuple(fusion.inputs)} if fusion else {}
        self.fusion = FusionHead(fusion, tuple(token_dims[m] for m in fusion.inputs), self.dims) if fusion else None
        t = loss_cfg.temperature
        self.scale_bounds = (math.log(1 / t.max), math.log(1 / t.min))
        if loss_cfg.pairs:
            self.pairs = [tuple(p.split("-")) for p in loss_cfg.pairs]
        else:
            self.pairs = list(combinations(sorted(token_dims), 2))
            self.pairs += [(f, m) for f, parts in self.fused.items() for m in sorted(token_dims) if m not in parts]
        self.logit_scales = nn.ParameterDict(
            {pair_name(a, b): nn.Parameter(torch.tensor(math.log(1 / t.init)), requires_grad=t.learnable) for a, b in self.pairs}
        )

    @property
    def modalities(self) -> list[str]:
        """Every embedded input: the modalities, then the fused one ("image+audio") if any."""
        return list(self.heads) + list(self.fused)

    def embed(self, modality: str, x: EncoderOutput) -> dict[int, torch.Tensor]:
        return self.heads[modality](x)

    def embed_fused(self, a: EncoderOutput, b: EncoderOutput) -> dict[int, torch.Tensor]:
        """The fused embedding of matching rows of the fusion's two inputs (in config order)."""
        return self.fusion(a, b)

    def forward(self, features: dict[str, EncoderOutput], present: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, torch.Tensor]]:
        """Embeddings of every modality present, and exp(logit scale) of every pair. With
        ``present`` ({m: (B,) bool}, as in Batch), the fused input is embedded on the rows that
        have both of its parts."""
        emb = {m: self.heads[m](x) for m, x in features.items()}
        for name, (a, b) in self.fused.items():
            if present is not None and a in features and b in features:
                both = present[a] & present[b]
                if both.any():
                    emb[name] = self.fusion(rows_of(features[a], present[a], both), rows_of(features[b], present[b], both))
        scales = {k: v.exp() for k, v in self.logit_scales.items()}
        return emb, scales

    @torch.no_grad()
    def clamp_scales(self) -> None:
        lo, hi = self.scale_bounds
        for p in self.logit_scales.values():
            p.clamp_(lo, hi)
