"""VLM: frozen image / audio tokens -> trainable projectors -> decoder (tiny, TRM or a LoRA-tuned LM).

    image tokens (B, T, D_img) + mask  --Projector-->  (B, P_img, d_model)  + modality embedding
    audio tokens (B, T, D_aud) + mask  --Projector-->  (B, P_aud, d_model)  + modality embedding
    concatenated streams (B, P_img + P_aud, d_model), mask False where a sample lacks a modality
    --DecoderFusion (prefix | cross_attention | gated | none)-->  decoder(question) -> answer tokens

Each stream's tokens are a frozen backbone's token sequence (cached like any frozen feature) or,
for an aligned encoder, what the alignment run's frozen head makes of them (its Perceiver
latents, or its embedding as one token): see ``AlignedHead``. A batch may mix samples with an
image only, audio only, or both: an absent stream is zero tokens with a False mask, which no
fusion attends to, pools over or injects, so a sample's answer does not depend on what else is
in its batch. The modality embeddings exist only when the model has two streams (so image-only
runs are unchanged).
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


STREAMS = ("image", "audio")


class ProjectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: Literal["none", "mean"] | int = Field(
        "mean", description="mean: one token; k: a k x k grid of a square (image) token map, or k equal time segments of a clip; none: all tokens")
    hidden: int | None = Field(256, ge=1, description="None: one linear layer")
    dropout: float = Field(0.0, ge=0, lt=1)


def pool_segments(x: EncoderOutput, k: int) -> EncoderOutput:
    """(B, T, D) -> (B, k, D): each row's real positions cut into k equal time segments, each
    averaged (segment j of a row of length L covers positions [j L / k, (j + 1) L / k)). A row
    shorter than k leaves its last segments empty (mask False)."""
    lengths = x.mask.sum(1)  # (B,)
    t = torch.arange(x.tokens.shape[1], device=x.tokens.device)
    seg = torch.div(t[None] * k, lengths.clamp_min(1)[:, None], rounding_mode="floor")  # (B, T)
    member = (seg[:, None, :] == torch.arange(k, device=seg.device)[None, :, None]) & x.mask[:, None, :]  # (B, k, T)
    count = member.sum(-1)
    tokens = member.to(x.tokens.dtype) @ x.tokens / count.clamp_min(1)[..., None].to(x.tokens.dtype)
    return EncoderOutput(tokens, count > 0, x.pooled)


def pool_tokens(x: EncoderOutput, pool: str | int, temporal: bool = False) -> EncoderOutput:
    """(B, T, D) -> (B, P, D): all tokens, their masked mean (P = 1), a k x k average grid of a
    square map, or (``temporal``) k time segments."""
    if pool == "none":
        return x
    if pool == "mean":
        mean = masked_mean(x.tokens, x.mask, keepdim=True)
        return EncoderOutput(mean, x.mask.any(1, keepdim=True), x.pooled)
    if temporal:
        return pool_segments(x, int(pool))
    side = math.isqrt(x.tokens.shape[1])
    if side * side != x.tokens.shape[1]:
        raise ValueError(f"projector.pool={pool}: {x.tokens.shape[1]} tokens are not a square map")
    grid = x.tokens.transpose(1, 2).reshape(x.tokens.shape[0], -1, side, side)
    tokens = F.adaptive_avg_pool2d(grid, int(pool)).flatten(2).transpose(1, 2)
    return EncoderOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device), x.pooled)


class Projector(nn.Module):
    """(B, T, D_in) -> pool -> LayerNorm -> MLP -> (B, P, d_model). ``temporal``: an integer
    pool cuts a clip into time segments instead of a square grid."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, d_model: int, temporal: bool = False):
        super().__init__()
        self.pool, self.temporal = cfg.pool, temporal
        layers: list[nn.Module] = [nn.LayerNorm(in_dim), nn.Dropout(cfg.dropout)]
        if cfg.hidden:
            layers += [nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, d_model)]
        else:
            layers += [nn.Linear(in_dim, d_model)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        x = pool_tokens(x, self.pool, self.temporal)
        return self.net(x.tokens), x.mask


VisionProjector = Projector  # the name of runs and notebooks before audio streams


class AlignedHead(nn.Module):
    """An alignment run's frozen image or audio head on top of backbone tokens (the seeds' phase 1 -> 2):

        output "latents"    Perceiver pooler only: its latents (B, K, D_perceiver)
        output "embedding"  any pooler: the L2-normalised Matryoshka embedding at ``dim`` as one token (B, 1, dim)
        output "auto"       latents for a Perceiver pooler, else the embedding
    """

    def __init__(self, head: nn.Module, output: str = "auto", dim: int | None = None, key: str = "vision"):
        super().__init__()
        self.head = head.requires_grad_(False).eval()
        perceiver = isinstance(head.pooler, PerceiverPooler)
        if output == "auto":
            output = "latents" if perceiver else "embedding"
        if output == "latents" and not perceiver:
            raise ConfigError(f"{key}.aligned_output: 'latents' needs a Perceiver pooler; this run's is {type(head.pooler).__name__}")
        dims = head.projection.dims
        self.dim = dim or dims[0]
        if not 1 <= self.dim <= dims[0]:
            raise ConfigError(f"{key}.aligned_dim: {self.dim} is outside 1..{dims[0]} (the run's Matryoshka dims: {dims})")
        self.output = output
        self.out_dim = head.pooler.out_dim if output == "latents" else self.dim

    def train(self, mode: bool = True) -> "AlignedHead":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: EncoderOutput) -> EncoderOutput:
        if self.output == "latents":
            tokens = self.head.pooler.resampler(x.tokens, x.mask)
        else:
            tokens = self.head.at_dim(x, self.dim).unsqueeze(1)
        return EncoderOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device), tokens.mean(1))


AlignedVision = AlignedHead


def _as_streams(feats: Any, batch_size: int, present: dict[str, torch.Tensor] | None) -> tuple[dict[str, EncoderOutput], dict[str, torch.Tensor]]:
    """(features per modality, present per modality) from a dict, or from one image EncoderOutput
    (every sample has the image)."""
    if feats is None:
        return {}, {}
    if isinstance(feats, EncoderOutput):
        feats = {"image": feats}
    present = dict(present or {})
    for m, f in feats.items():
        if m not in present:
            present[m] = torch.ones(batch_size, dtype=torch.bool, device=f.tokens.device)
    return feats, present


class VLM(nn.Module):
    """Projectors (one per stream), fusion and decoder; ``vision`` / ``audio_head``: an
    alignment run's frozen heads in front of the projectors, or None."""

    def __init__(self, decoder: Decoder, fusion: DecoderFusion, projector: Projector | None, vision: AlignedHead | None = None,
                 audio_projector: Projector | None = None, audio_head: AlignedHead | None = None):
        super().__init__()
        self.decoder, self.fusion, self.projector, self.vision = decoder, fusion, projector, vision
        self.audio_projector, self.audio_head = audio_projector, audio_head
        self.streams = tuple(m for m, p in zip(STREAMS, (projector, audio_projector)) if p is not None)
        self.modality_embedding = nn.Parameter(0.02 * torch.randn(len(self.streams), decoder.d_model)) if len(self.streams) > 1 else None

    def _stream(self, m: str) -> tuple[AlignedHead | None, Projector]:
        return (self.vision, self.projector) if m == "image" else (self.audio_head, self.audio_projector)

    def inputs(self, feats: Any, batch_size: int, device: torch.device,
               present: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
        """(B, P, d_model) tokens of every stream, concatenated, their (B, P) mask and each of
        the model's streams' slice of P (empty for a stream no sample in the batch has). ``feats``: {modality: EncoderOutput of the samples that have it}
        with ``present`` {modality: (B,) bool}, or one image EncoderOutput for all samples."""
        feats, present = _as_streams(feats, batch_size, present)
        d = self.decoder.d_model
        tokens, masks, segments, start = [], [], [], 0
        if self.fusion.uses_image:
            for i, m in enumerate(self.streams):
                if m not in feats or not bool(present[m].any()):
                    segments.append(slice(start, start))
                    continue
                head, projector = self._stream(m)
                f = feats[m].to(device)
                if head is not None:
                    f = head(f)
                t, k = projector(f)
                if self.modality_embedding is not None:
                    t = t + self.modality_embedding[i].to(t.dtype)
                has = present[m].to(device)
                full = t.new_zeros(batch_size, t.shape[1], d)
                full[has] = t
                fmask = torch.zeros(batch_size, t.shape[1], dtype=torch.bool, device=device)
                fmask[has] = k
                tokens.append(full)
                masks.append(fmask)
                segments.append(slice(start, start + t.shape[1]))
                start += t.shape[1]
        if not tokens:
            return torch.zeros(batch_size, 0, d, device=device), torch.zeros(batch_size, 0, dtype=torch.bool, device=device), segments
        return torch.cat(tokens, 1), torch.cat(masks, 1), segments

    def visual(self, feats: Any, batch_size: int, device: torch.device,
               present: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, d_model) stream tokens and mask; P = 0 without any input (see ``inputs``)."""
        tokens, mask, _ = self.inputs(feats, batch_size, device, present)
        return tokens, mask

    def forward(self, feats: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                present: dict[str, torch.Tensor] | None = None) -> DecoderOutput:
        visual, vmask, segments = self.inputs(feats, input_ids.shape[0], input_ids.device, present)
        prefix, pmask = self.fusion.prefix(visual, vmask)
        with self.fusion.attached(self.decoder, visual, vmask, segments):
            return self.decoder(prefix, input_ids, attention_mask, labels, pmask, return_logits=False)

    @torch.no_grad()
    def answer(self, feats: Any, questions: Sequence[str], max_new_tokens: int,
               present: dict[str, torch.Tensor] | None = None) -> list[str]:
        was = self.training
        self.eval()
        try:
            visual, vmask, segments = self.inputs(feats, len(questions), self.device, present)
            prefix, pmask = self.fusion.prefix(visual, vmask)
            with self.fusion.attached(self.decoder, visual, vmask, segments):
                return self.decoder.answer(prefix, list(questions), max_new_tokens, pmask)
        finally:
            self.train(was)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (projectors, fusion, decoder or its LoRA adapters): a LoRA
        run does not store the frozen LM, nor an aligned run's frozen heads."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names or not k.startswith(("decoder.lm.", "vision.", "audio_head."))}


class VisionLanguageModel(nn.Module):
    """A trained vlm run: frozen image / audio encoders -> (aligned heads) -> projectors -> decoder.

        vlm = edge_glass.load("runs/trm")
        vlm.answer(["shape.png"], ["what shape is in the image?"])         # -> ["circle"]
        vlm.answer(images=["shape.png"], audio=["what_shape.wav"])          # a spoken question
        vlm.transcribe(["prompt.wav"])                                      # speech to text
        vlm.describe(images=["photo.jpg"], audio=["caption.wav"])

    Any list may hold None for a sample without that input. A run trained with ``drop:
    [question]`` ignores text questions (it hears them instead).
    """

    def __init__(self, cfg: Any, encoder: nn.Module | None, core: VLM, majority: str | None = None, run_dir: Any = None,
                 audio_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg, self.encoder, self.core, self.majority, self.run_dir = cfg, encoder, core.eval(), majority, run_dir
        self.audio_encoder = audio_encoder

    def _features(self, items: Sequence[Any] | None, encoder: nn.Module | None, modality: str, n: int,
                  feats: dict[str, EncoderOutput], present: dict[str, torch.Tensor]) -> None:
        if items is None or modality not in self.core.streams or not self.core.fusion.uses_image:
            return
        if len(items) != n:
            raise EdgeGlassError(f"answer: {len(items)} {modality} inputs for {n} samples")
        has = torch.tensor([x is not None for x in items], dtype=torch.bool)
        if has.any():
            feats[modality] = encoder.encode([x for x in items if x is not None])
            present[modality] = has

    @torch.no_grad()
    def answer(self, images: Sequence[Any] | None = None, questions: Sequence[str] | None = None,
               max_new_tokens: int | None = None, audio: Sequence[Any] | None = None) -> list[str]:
        """Paths/bytes/PIL images and/or audio clips (paths/bytes) and an optional question each
        -> generated answers."""
        n = next((len(x) for x in (images, audio, questions) if x is not None), 0)
        if n == 0:
            raise EdgeGlassError("answer: give images, audio or questions")
        if questions is not None and len(questions) != n:
            raise EdgeGlassError(f"answer: {len(questions)} questions for {n} samples")
        questions = [q or "" for q in questions] if questions is not None else [""] * n
        if "question" in getattr(self.cfg, "drop", ()):
            questions = [""] * n
        feats: dict[str, EncoderOutput] = {}
        present: dict[str, torch.Tensor] = {}
        self._features(images, self.encoder, "image", n, feats, present)
        self._features(audio, self.audio_encoder, "audio", n, feats, present)
        return self.core.answer(feats, questions, max_new_tokens or self.cfg.eval.max_new_tokens, present)

    def describe(self, images: Sequence[Any] | None = None, audio: Sequence[Any] | None = None) -> list[str]:
        from ..data.vqa import DESCRIBE

        n = len(images if images is not None else audio or [])
        return self.answer(images, [DESCRIBE] * n, audio=audio)

    def transcribe(self, audio: Sequence[Any], max_new_tokens: int | None = None) -> list[str]:
        from ..data.spoken_qa import TRANSCRIBE

        return self.answer(None, [TRANSCRIBE] * len(audio), max_new_tokens, audio=audio)
