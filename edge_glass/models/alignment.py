"""AlignmentModel: per-modality heads (pooler -> Matryoshka projection) + learnable temperatures,
and optionally a fusion head that embeds two modalities together (e.g. "image+audio").

It sees frozen-encoder outputs, never raw inputs, so it trains the same from cached features or
live encoding:  {modality: EncoderOutput} -> {modality: {dim: (B, dim) unit vectors}}.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Iterable

import torch
from torch import nn

from ..encoders.base import Encoder, EncoderOutput, TrainableEncoder
from ..errors import EdgeGlassError
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
    """Heads (+ the trainable encoders, if any) -> {modality: {dim: embedding}} and temperatures.
    Inputs are EncoderOutputs of frozen encoders, or collated inputs of ``encoders[m]``."""

    def __init__(self, model_cfg, loss_cfg, token_dims: dict[str, int], encoders: dict[str, TrainableEncoder] | None = None):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders or {})
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

    def tokens(self, modality: str, x: Any) -> EncoderOutput:
        """Frozen features as they are; a trainable encoder's inputs through the encoder."""
        return self.encoders[modality](x) if modality in self.encoders else x

    def embed(self, modality: str, x: Any) -> dict[int, torch.Tensor]:
        return self.heads[modality](self.tokens(modality, x))

    def embed_fused(self, a: Any, b: Any) -> dict[int, torch.Tensor]:
        """The fused embedding of matching rows of the fusion's two inputs (in config order)."""
        (ma, mb), = self.fused.values()
        return self.fusion(self.tokens(ma, a), self.tokens(mb, b))

    def forward(self, features: dict[str, EncoderOutput], present: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, torch.Tensor]]:
        """Embeddings of every modality present, and exp(logit scale) of every pair. With
        ``present`` ({m: (B,) bool}, as in Batch), the fused input is embedded on the rows that
        have both of its parts."""
        features = {m: self.tokens(m, x) for m, x in features.items()}
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


class AlignedModel(nn.Module):
    """Frozen encoders + trained heads: raw inputs -> embeddings in the shared space, on one device.

        model = edge_glass.load("runs/quickstart", device="cuda")
        img = model.encode_images(["a.jpg", pil_image], dim=128)    # (2, 128) CPU tensor, unit rows
    """

    def __init__(self, cfg: Any, encoders: dict[str, Encoder], core: AlignmentModel, run_dir: Any = None):
        super().__init__()
        self.cfg, self.run_dir = cfg, run_dir
        self.encoders = nn.ModuleDict(encoders)
        self.core = core.eval()

    @property
    def dims(self) -> list[int]:
        return self.core.dims

    def check_dim(self, dim: int | None) -> int:
        """``dim`` (None: the largest) checked against the trained dims."""
        if dim is None:
            return self.dims[0]
        if not 1 <= dim <= self.dims[0]:
            raise EdgeGlassError(f"--dim {dim}: outside 1..{self.dims[0]} (trained dims: {self.dims})")
        return dim

    def encoder(self, modality: str) -> Encoder:
        if modality not in self.encoders:
            raise EdgeGlassError(f"this model has no {modality} encoder (it has {', '.join(self.encoders)})")
        return self.encoders[modality]

    @torch.no_grad()
    def encode(self, modality: str, items: Iterable[Any], dim: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """(N, dim) L2-normalised embeddings (on the CPU); any dim up to the largest trained one (nested)."""
        enc = self.encoder(modality)
        dim = self.check_dim(dim)
        items = list(items)
        head = self.core.heads[modality]
        bs = batch_size or enc.cfg.batch_size
        out = [head.at_dim(enc.encode(items[s : s + bs]), dim).cpu() for s in range(0, len(items), bs)]  # trainable: the core's own encoder
        return torch.cat(out) if out else torch.empty(0, dim)

    @torch.no_grad()
    def encode_fused(self, first: Iterable[Any], second: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Pairs of inputs of the fusion's two modalities, in its config order (images and audio
        clips for "image+audio") -> (N, dim): one embedding per pair, e.g. a spoken question
        about a photo as one query."""
        if self.core.fusion is None:
            raise EdgeGlassError("this model has no fusion head (model.fusion in its config)")
        ((a, b),) = self.core.fused.values()
        first, second = list(first), list(second)
        if len(first) != len(second):
            raise EdgeGlassError(f"encode_fused: {len(first)} {a} inputs but {len(second)} {b} inputs")
        dim = self.check_dim(dim)
        bs = min(self.encoders[a].cfg.batch_size, self.encoders[b].cfg.batch_size)
        out = [self.core.fusion.at_dim(self.encoders[a].encode(first[s : s + bs]), self.encoders[b].encode(second[s : s + bs]), dim).cpu()
               for s in range(0, len(first), bs)]
        return torch.cat(out) if out else torch.empty(0, dim)

    def encode_images(self, images: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Paths, bytes or PIL images -> (N, dim)."""
        return self.encode("image", images, dim)

    def encode_texts(self, texts: Iterable[str], dim: int | None = None) -> torch.Tensor:
        return self.encode("text", texts, dim)

    def encode_audio(self, clips: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Audio file paths or bytes -> (N, dim)."""
        return self.encode("audio", clips, dim)
