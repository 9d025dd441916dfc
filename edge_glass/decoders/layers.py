"""Transformer pieces shared by the tiny decoders: RMSNorm, rotary positions, causal attention,
SwiGLU, blocks and a block stack.

Shapes: B batch, S sequence, D d_model, H heads, Dh = D / H head size.
Masks are boolean, True where a position is real. Positions are per row (B, S) so that padding
anywhere in a row (left padding of prompts at generation time) leaves real tokens with the same
rotary positions as in an unpadded sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) for head size Dh."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) long -> cos, sin (B, 1, S, Dh), ready to broadcast over heads."""
        angles = positions.float()[..., None] * self.inv_freq  # (B, S, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, Dh) rotated by the angles of its positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, S) bool -> positions (B, S): index among the real tokens of the row (pads: 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, S) bool -> (B, 1, S, S) bool, True where query i may attend key j:
    j <= i and key j is real. Every query may attend itself, so padded rows never see an
    all-masked softmax (their outputs are ignored anyway)."""
    S = mask.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask[:, None, :]
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; (B, S, D) -> (B, S, D)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down; hidden size = ffn_mult * d_model (rounded up to 8)."""

    def __init__(self, d_model: int, ffn_mult: float):
        super().__init__()
        hidden = max(8, -(-int(round(ffn_mult * d_model)) // 8) * 8)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Attention + SwiGLU with residuals. Pre-norm (x + f(norm(x))) by default; post-norm
    (norm(x + f(x))) keeps activations at unit scale when the block is applied recursively (TRM)."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: float, dropout: float = 0.0, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp = SwiGLU(d_model, ffn_mult)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, attn_mask, cos, sin)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), attn_mask, cos, sin))
        return x + self.drop(self.mlp(self.norm2(x)))


class BlockStack(nn.Module):
    """n causal blocks sharing one rotary table: h (B, S, D), mask (B, S) bool -> (B, S, D).

    ``prepare(mask)`` builds the attention mask and rotary angles once; pass its result to
    ``forward`` to reuse it across many applications (TRM applies the stack dozens of times)."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn_mult: float, dropout: float = 0.0,
                 post_norm: bool = False, rope_base: float = 10000.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ffn_mult, dropout, post_norm) for _ in range(n_layers))
        self.rotary = Rotary(d_model // n_heads, rope_base)

    def prepare(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(positions_from_mask(mask))
        return causal_attention_mask(mask), cos, sin

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None,
                prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if prepared is None:
            if mask is None:
                mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            prepared = self.prepare(mask)
        attn_mask, cos, sin = prepared
        for block in self.blocks:
            h = block(h, attn_mask, cos, sin)
        return h
