"""VLM: frozen visual tokens -> trainable projector -> decoder (tiny, TRM or a LoRA-tuned LM).

    image tokens (B, T, D_in) + mask  --VisionProjector-->  (B, P, d_model)
    --DecoderFusion (prefix | cross_attention | gated | none)-->  decoder(question) -> answer tokens

The visual tokens are a frozen backbone's token sequence (cached like any frozen feature) or,
for an aligned vision encoder, what the alignment run's frozen image head makes of them (its
Perceiver latents, or its embedding as one token): see ``AlignedVision``.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..decoders import Decoder, DecoderOutput
from ..decoders.fusion import DecoderFusion
from ..encoders.base import EncoderOutput
from ..heads.perceiver import PerceiverPooler


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
        w = x.mask.to(x.tokens.dtype).unsqueeze(-1)
        mean = (x.tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
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
    """An alignment run's frozen image head on top of backbone tokens:
    Perceiver pooler -> its latents (B, K, dim); any other pooler -> the embedding (B, 1, max dim)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head.requires_grad_(False).eval()
        pooler = head.pooler
        self.out_dim = pooler.out_dim if isinstance(pooler, PerceiverPooler) else head.projection.dims[0]

    def train(self, mode: bool = True) -> "AlignedVision":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: EncoderOutput) -> EncoderOutput:
        pooler = self.head.pooler
        if isinstance(pooler, PerceiverPooler):
            tokens = pooler.resampler(x.tokens, x.mask)
        else:
            tokens = F.normalize(self.head.project(x), dim=-1).unsqueeze(1)
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
            visual, vmask = self.visual(feats, len(questions), next(self.decoder.parameters()).device)
            prefix, pmask = self.fusion.prefix(visual, vmask)
            with self.fusion.attached(self.decoder, visual, vmask):
                return self.decoder.answer(prefix, list(questions), max_new_tokens, pmask)
        finally:
            self.train(was)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (projector, fusion, decoder or its LoRA adapters): a LoRA
        run does not store the frozen LM."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names or not k.startswith(("decoder.lm.", "vision."))}
