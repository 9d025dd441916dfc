"""Matryoshka projection: one vector -> nested embeddings, L2-normalised at every dim.

(B, in_dim) -> z (B, max(dims)); embeddings[d] = normalize(z[:, :d]) for each d in dims, so the
first d coordinates of the full embedding are themselves a usable d-dim embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ProjectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int | None = Field(None, ge=1, description="None: one linear layer; else a 2-layer MLP")
    dropout: float = Field(0.0, ge=0, lt=1)


class MatryoshkaProjection(nn.Module):
    def __init__(self, in_dim: int, dims: list[int], cfg: ProjectionConfig):
        super().__init__()
        self.dims = sorted(dims, reverse=True)
        out = self.dims[0]
        if cfg.hidden:
            self.net = nn.Sequential(
                nn.Dropout(cfg.dropout), nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, out)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_dim, out))

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        z = self.net(x)
        return {d: F.normalize(z[:, :d], dim=-1) for d in self.dims}

    def at_dim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """(B, in_dim) -> (B, dim) unit vectors, for any dim up to the largest (nested prefix)."""
        return F.normalize(self.net(x)[:, :dim], dim=-1)
