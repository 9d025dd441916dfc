"""VLM: frozen visual tokens -> trainable projector -> decoder (tiny, TRM or a LoRA-tuned LM).

    image tokens (B, T, D_in) + mask  --VisionProjector-->  (B, P, d_model)
    --DecoderFusion (prefix | cross_attention | gated | none)-->  decoder(question) -> answer tokens

The visual tokens are a frozen backbone's token sequence (cached like any frozen feature) or,
for an aligned vision encoder, what the alignment run's frozen image head makes of them (its
Perceiver latents, or its embedding as one token): see ``AlignedVision``.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..decoders import Decoder, DecoderOutput
from ..decoders.fusion import DecoderFusion
from ..encoders.base import EncoderOutput
from ..errors import ConfigError, EdgeGlassError
from ..heads.perceiver import PerceiverPooler
from ..tensors import masked_mean


class ProjectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: Literal["none", "mean"] | int = Field("mean", description="mean: one token; k: a k x k grid of a square token map; none: all tokens")
    hidden: int | None = Field(256, ge=1, description="None: one linear layer")
    dropout: float = Field(0.0, ge=0, lt=1)


def pool_tokens(x: EncoderOutput, pool: str | int) -> EncoderOutput:
    """(B, T, D) -> (B, P, D): all tokens, their masked mean (P = 1) or a k x k average grid."""
    if pool == "none":
        return x
    if pool == "mean":
        mean = masked_mean(x.tokens, x.mask, keepdim=True)
        return EncoderOutput(mean, x.mask[:, :1] | True, x.pooled)
    side = math.isqrt(x.tokens.shape[1])
    if side * side != x.tokens.shape[1]:
        raise ValueError(f"projector.pool={pool}: {x.tokens.shape[1]} tokens are not a square map")
    grid = x.tokens.transpose(1, 2).reshape(x.tokens.shape[0], -1, side, side)
    tokens = F.adaptive_avg_pool2d(grid, int(pool)).flatten(2).transpose(1, 2)
    return EncoderOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device), x.pooled)


class VisionProjector(nn.Module):
    """(B, T, D_in) -> pool -> LayerNorm -> MLP -> (B, P, d_model)."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, d_model: int):
        super().__init__()
        self.pool = cfg.pool
        layers: list[nn.Module] = [nn.LayerNorm(in_dim), nn.Dropout(cfg.dropout)]
        if cfg.hidden:
            layers += [nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, d_model)]
        else:
            layers += [nn.Linear(in_dim, d_model)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        x = pool_tokens(x, self.pool)
        return self.net(x.tokens), x.mask


class AlignedVision(nn.Module):
    """An alignment run's frozen image head on top of backbone tokens (the seeds' phase 1 -> 2):

        output "latents"    Perceiver pooler only: its latents (B, K, D_perceiver)
        output "embedding"  any pooler: the L2-normalised Matryoshka embedding at ``dim`` as one token (B, 1, dim)
        output "auto"       latents for a Perceiver pooler, else the embedding
    """

    def __init__(self, head: nn.Module, output: str = "auto", dim: int | None = None):
        super().__init__()
        self.head = head.requires_grad_(False).eval()
        perceiver = isinstance(head.pooler, PerceiverPooler)
        if output == "auto":
            output = "latents" if perceiver else "embedding"
        if output == "latents" and not perceiver:
            raise ConfigError(f"vision.aligned_output: 'latents' needs a Perceiver image pooler; this run's is {type(head.pooler).__name__}")
        dims = head.projection.dims
        self.dim = dim or dims[0]
        if not 1 <= self.dim <= dims[0]:
            raise ConfigError(f"vision.aligned_dim: {self.dim} is outside 1..{dims[0]} (the run's Matryoshka dims: {dims})")
        self.output = output
        self.out_dim = head.pooler.out_dim if output == "latents" else self.dim

    def train(self, mode: bool = True) -> "AlignedVision":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: EncoderOutput) -> EncoderOutput:
        if self.output == "latents":
            tokens = self.head.pooler.resampler(x.tokens, x.mask)
        else:
            tokens = self.head.at_dim(x, self.dim).unsqueeze(1)
        return EncoderOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device), tokens.mean(1))


class VLM(nn.Module):
    def __init__(self, decoder: Decoder, fusion: DecoderFusion, projector: VisionProjector | None, vision: AlignedVision | None = None):
        super().__init__()
        self.decoder, self.fusion, self.projector, self.vision = decoder, fusion, projector, vision

    def visual(self, feats: EncoderOutput | None, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, d_model) visual tokens and mask; P = 0 without an image."""
        if feats is None or not self.fusion.uses_image:
            empty = torch.zeros(batch_size, 0, self.decoder.d_model, device=device)
            return empty, torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        feats = feats.to(device)
        if self.vision is not None:
            feats = self.vision(feats)
        return self.projector(feats)

    def forward(self, feats: EncoderOutput | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> DecoderOutput:
        visual, vmask = self.visual(feats, input_ids.shape[0], input_ids.device)
        prefix, pmask = self.fusion.prefix(visual, vmask)
        with self.fusion.attached(self.decoder, visual, vmask):
            return self.decoder(prefix, input_ids, attention_mask, labels, pmask, return_logits=False)

    @torch.no_grad()
    def answer(self, feats: EncoderOutput | None, questions: Sequence[str], max_new_tokens: int) -> list[str]:
        was = self.training
        self.eval()
        try:
            visual, vmask = self.visual(feats, len(questions), self.device)
            prefix, pmask = self.fusion.prefix(visual, vmask)
            with self.fusion.attached(self.decoder, visual, vmask):
                return self.decoder.answer(prefix, list(questions), max_new_tokens, pmask)
        finally:
            self.train(was)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (projector, fusion, decoder or its LoRA adapters): a LoRA
        run does not store the frozen LM."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names or not k.startswith(("decoder.lm.", "vision."))}


class VisionLanguageModel(nn.Module):
    """A trained vlm run: frozen vision encoder -> (aligned head) -> projector -> decoder.

        vlm = edge_glass.load("runs/trm")
        vlm.answer(["shape.png"], ["what shape is in the image?"])   # -> ["circle"]
    """

    def __init__(self, cfg: Any, encoder: nn.Module, core: VLM, majority: str | None = None, run_dir: Any = None):
        super().__init__()
        self.cfg, self.encoder, self.core, self.majority, self.run_dir = cfg, encoder, core.eval(), majority, run_dir

    @torch.no_grad()
    def answer(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Paths/bytes/PIL images and one question each -> generated answers."""
        if len(images) != len(questions):
            raise EdgeGlassError(f"answer: {len(images)} images but {len(questions)} questions")
        feats = self.encoder.encode(list(images)) if self.core.fusion.uses_image else None
        return self.core.answer(feats, list(questions), max_new_tokens or self.cfg.eval.max_new_tokens)

    def describe(self, images: Sequence[Any]) -> list[str]:
        from ..data.vqa import DESCRIBE

        return self.answer(images, [DESCRIBE] * len(images))
