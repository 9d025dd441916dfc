"""Building blocks of NL-MM: token mixers in encoder blocks, cross-attention, positions.

Shapes: B batch, T tokens, D d_model. Masks are boolean (B, T), True at real tokens; padding may
sit anywhere in a row. Every block leaves padded positions at zero, so a padded batch and the
same sequences one by one give the same outputs at real tokens.

    Block(x, mask)         x + mixer(LN x) ; x + FFN(LN x)     mixer: fast-weight (gated delta rule,
                           delta, linear) or softmax attention; bidirectional blocks (encoders of
                           images and audio, whose tokens have no causal order) run the causal
                           mixer forward and over the time-reversed sequence and sum the two
    CrossAttention(q, kv)  multi-head attention of queries over a masked key set (no positions:
                           a set is order-free)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nested.attention import SoftmaxAttention
from ..nested.fast_weights import FastWeightAttention

Tensor = torch.Tensor
MIXERS = ("gated_delta", "delta", "linear", "softmax")


def masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask[..., None].to(x.dtype)


def make_mixer(kind: str, d_model: int, heads: int, chunk_size: int = 64) -> nn.Module:
    """A causal token mixer: a fast-weight rule or softmax attention (same conv front, same interface)."""
    if kind == "softmax":
        return SoftmaxAttention(d_model, heads)
    if kind not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {kind!r}")
    return FastWeightAttention(d_model, heads, rule=kind, chunk_size=chunk_size)


def flip_rows(x: Tensor) -> Tensor:
    """Reverse the time axis (dim 1)."""
    return torch.flip(x, dims=[1])


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm mixer + feed-forward block; ``bidirectional`` sums a forward and a reversed pass
    of the one (causal) mixer."""

    def __init__(self, d_model: int, heads: int, mixer: str = "gated_delta", ffn_mult: int = 4,
                 bidirectional: bool = False, chunk_size: int = 64):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mixer = make_mixer(mixer, d_model, heads, chunk_size)
        self.ffn = FeedForward(d_model, ffn_mult * d_model)
        self.bidirectional = bidirectional

    def mix(self, h: Tensor, mask: Tensor | None) -> Tensor:
        y, _ = self.mixer(h, mask)
        if self.bidirectional:
            back, _ = self.mixer(flip_rows(h), None if mask is None else flip_rows(mask))
            y = y + flip_rows(back)
        return y

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.mix(masked(self.norm1(x), mask), mask)
        return masked(x + self.ffn(self.norm2(x)), mask)


class BlockStack(nn.Module):
    """Blocks in sequence; ``gradient_checkpointing`` recomputes each block's activations in the
    backward pass (training only) instead of keeping them."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


class CrossAttention(nn.Module):
    """Queries (B, Q, D) attend a key set (B, K, D) with key mask (B, K); a query whose keys are
    all masked gets zeros (never NaN)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model), nn.Linear(d_model, d_model)

    def forward(self, q: Tensor, kv: Tensor, kv_mask: Tensor | None = None) -> Tensor:
        B, Q, D = q.shape
        K = kv.shape[1]
        h = self.heads
        qh = self.q(q).view(B, Q, h, D // h).transpose(1, 2)
        k, v = self.kv(kv).view(B, K, 2, h, D // h).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if kv_mask is not None:
            any_key = kv_mask.any(1)
            allowed = kv_mask | ~any_key[:, None]  # rows without keys: attend all, zeroed below
            attn_mask = allowed[:, None, None, :]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=attn_mask)
        o = o.transpose(1, 2).reshape(B, Q, D)
        if kv_mask is not None:
            o = o * any_key[:, None, None].to(o.dtype)
        return self.out(o)


class CrossBlock(nn.Module):
    """x + CrossAttention(LN x, LN kv) ; x + FFN(LN x)."""

    def __init__(self, d_model: int, heads: int, ffn_mult: int = 2):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CrossAttention(d_model, heads)
        self.ffn = FeedForward(d_model, ffn_mult * d_model)

    def forward(self, x: Tensor, kv: Tensor, kv_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(kv), kv_mask)
        return x + self.ffn(self.norm2(x))


def sincos_1d(n: int, dim: int, device=None) -> Tensor:
    """(n, dim) sinusoidal positions (sin in the first half, cos in the second)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / max(1, half))
    angles = torch.arange(n, dtype=torch.float32, device=device)[:, None] * freq
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(out, (0, dim - 2 * half))


def sincos_2d(h: int, w: int, dim: int, device=None) -> Tensor:
    """(h * w, dim) row-major 2-D sinusoidal positions (half the channels for rows, half for columns)."""
    a = dim // 2
    rows = sincos_1d(h, a, device)[:, None, :].expand(h, w, a)
    cols = sincos_1d(w, dim - a, device)[None, :, :].expand(h, w, dim - a)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim)
