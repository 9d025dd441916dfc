"""How visual tokens reach a decoder (the same three ways for tiny, TRM and Hugging Face LMs):

prefix           visual tokens (B, P, d) are prepended to the text embeddings (default; LLaVA)
cross_attention  text hidden states attend to the visual tokens after every decoder block, through
                 a residual gated by tanh(alpha) with alpha = 0 at init (Flamingo): the decoder
                 starts out exactly as without the image
gated            the mean visual token, projected, is added to every text token embedding, gated
                 by tanh(beta), beta = 0 at init
none             no image at all: the question-only ablation

The cross-attention and gated fusions act through forward hooks on ``decoder.blocks()`` and
``decoder.token_embedding()``, attached for the duration of one forward pass or generation
(``with fusion.attached(decoder, visual, mask, segments): ...``), so decoders need no fusion code.

Several input streams (image tokens, audio tokens) arrive concatenated along P with their masks
(False for padding and for samples that lack a stream) and ``segments``, each stream's slice of
P. prefix and cross_attention take the concatenation as it is (masked positions are never
attended to; a row with no valid position at all gets no cross-attention update); gated keeps
one projection and gate per stream and injects only the streams a sample has.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..registry import Registry
from ..tensors import masked_mean

DECODER_FUSIONS = Registry("decoder fusion")


class DecoderFusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecoderFusion(nn.Module):
    Config: ClassVar[type[DecoderFusionConfig]]
    uses_image: bool = True

    def prefix(self, visual: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What goes in front of the text: (B, P, d) tokens and (B, P) mask (P may be 0)."""
        return visual[:, :0], mask[:, :0]

    @contextmanager
    def attached(self, decoder: Any, visual: torch.Tensor, mask: torch.Tensor, segments: list[slice] | None = None) -> Iterator[None]:
        yield


def _replace_hidden(output: Any, fn) -> Any:
    """Apply fn to a block's hidden-state output, whether it returns a tensor or a tuple."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


class PrefixConfig(DecoderFusionConfig):
    type: Literal["prefix"] = "prefix"


@DECODER_FUSIONS.register("prefix")
class PrefixFusion(DecoderFusion):
    Config = PrefixConfig

    def __init__(self, cfg: PrefixConfig, d_model: int, n_blocks: int, streams: int = 1):
        super().__init__()

    def prefix(self, visual, mask):
        return visual, mask


class NoImageConfig(DecoderFusionConfig):
    type: Literal["none"] = "none"


@DECODER_FUSIONS.register("none")
class NoImage(DecoderFusion):
    Config = NoImageConfig
    uses_image = False

    def __init__(self, cfg: NoImageConfig, d_model: int, n_blocks: int, streams: int = 1):
        super().__init__()


class GatedCrossAttention(nn.Module):
    """h (B, S, d) + tanh(alpha) * MHA(LN(h), visual, visual); alpha = 0 at init. Rows whose
    mask is all False (no input at all) are left unchanged."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.norm(h)
        has = mask.any(1)
        if not bool(has.all()):  # a softmax over no key is NaN: let such rows see a key, then drop their update
            mask = mask.clone()
            mask[~has, 0] = True
        out = self.attn(q, visual.to(q.dtype), visual.to(q.dtype), key_padding_mask=~mask, need_weights=False)[0]
        out = out * has[:, None, None].to(out.dtype)
        return h + torch.tanh(self.alpha).to(h.dtype) * out


class CrossAttentionConfig(DecoderFusionConfig):
    type: Literal["cross_attention"] = "cross_attention"
    heads: int = Field(4, ge=1)
    every: int = Field(1, ge=1, description="a cross-attention layer after every k-th decoder block")


@DECODER_FUSIONS.register("cross_attention")
class CrossAttentionFusion(DecoderFusion):
    Config = CrossAttentionConfig

    def __init__(self, cfg: CrossAttentionConfig, d_model: int, n_blocks: int, streams: int = 1):
        super().__init__()
        if d_model % cfg.heads:
            raise ValueError(f"decoder fusion: d_model {d_model} is not divisible by heads {cfg.heads}")
        self.every = cfg.every
        self.layers = nn.ModuleList(GatedCrossAttention(d_model, cfg.heads) for _ in range(0, n_blocks, cfg.every))

    @contextmanager
    def attached(self, decoder, visual, mask, segments=None):
        if visual.shape[1] == 0:  # no input stream in this batch
            yield
            return
        blocks = decoder.blocks()[self.every - 1 :: self.every]
        handles = [
            block.register_forward_hook(lambda _m, _i, out, layer=layer: _replace_hidden(out, lambda h: layer(h, visual, mask)))
            for block, layer in zip(blocks, self.layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class GatedConfig(DecoderFusionConfig):
    type: Literal["gated"] = "gated"


@DECODER_FUSIONS.register("gated")
class GatedInjection(DecoderFusion):
    """Per stream s: tanh(beta_s) * W_s(mean of the sample's stream-s tokens), summed over the
    streams the sample has, added to every text token embedding. Stream 0 keeps the names of
    the single-stream fusion (``proj``, ``beta``); further streams are ``extra_proj`` /
    ``extra_beta``."""

    Config = GatedConfig

    def __init__(self, cfg: GatedConfig, d_model: int, n_blocks: int, streams: int = 1):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        self.beta = nn.Parameter(torch.zeros(()))
        self.extra_proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(streams - 1))
        self.extra_beta = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(streams - 1))

    def injection(self, visual: torch.Tensor, mask: torch.Tensor, segments: list[slice] | None = None) -> torch.Tensor:
        """(B, d): what is added to every token embedding."""
        segments = segments or [slice(0, visual.shape[1])]
        if len(segments) > 1 + len(self.extra_proj):
            raise ValueError(f"gated fusion: {len(segments)} input streams, built for {1 + len(self.extra_proj)}")
        out = visual.new_zeros(visual.shape[0], visual.shape[2])
        for i, seg in enumerate(segments):
            v, m = visual[:, seg], mask[:, seg]
            proj, beta = (self.proj, self.beta) if i == 0 else (self.extra_proj[i - 1], self.extra_beta[i - 1])
            out = out + torch.tanh(beta) * proj(masked_mean(v, m)) * m.any(1, keepdim=True).to(v.dtype)
        return out

    @contextmanager
    def attached(self, decoder, visual, mask, segments=None):
        if visual.shape[1] == 0:
            yield
            return
        inject = self.injection(visual, mask, segments)  # (B, d)
        handle = decoder.token_embedding().register_forward_hook(lambda _m, _i, out: out + inject[: out.shape[0], None].to(out.dtype))
        try:
            yield
        finally:
            handle.remove()
