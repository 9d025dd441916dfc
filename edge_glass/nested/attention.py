"""Softmax attention baselines for the fast-weight layers: full causal and sliding-window.

Same interface as :class:`~edge_glass.nested.fast_weights.FastWeightAttention`
(``forward(x, mask=None, state=None, mode=None) -> (y, state)``) and the same short causal
depthwise convolution on q / k / v, so that a comparison between them isolates the token mixer:

    o_t = sum_{i in W(t)} softmax_i(q_t . k_i / sqrt(d_h)) v_i,
    W(t) = {i <= t}                   (full causal)
    W(t) = {t - window < i <= t}      (sliding window)

No positional embedding: the convolution gives every layer the local order it needs (as in the
fast-weight layers), and nothing ties a model to the lengths it was trained on. Memory grows with
T^2 (full) or T * window; streaming state is not supported (``state`` must be None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fast_weights import causal_conv


class SoftmaxAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, window: int | None = None,
                 conv_size: int = 4, bias: bool = False):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (or None for full attention), got {window}")
        self.n_heads = n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.window = window
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=bias)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_size, groups=3 * inner) if conv_size > 1 else None
        self.out = nn.Linear(inner, d_model, bias=bias)

    def _allowed(self, T: int, mask: torch.Tensor | None, device) -> torch.Tensor:
        i = torch.arange(T, device=device)
        allowed = i[None, :] <= i[:, None]                                   # (T query, T key) causal
        if self.window is not None:
            allowed = allowed & (i[None, :] > i[:, None] - self.window)
        allowed = allowed[None, None]
        if mask is not None:
            keys = mask.bool()[:, None, None, :]
            allowed = allowed & keys
            # a padded query with no visible key would softmax over nothing: let it see itself
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None, None]
        return allowed

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, state=None, mode: str | None = None):
        if state is not None:
            raise ValueError("SoftmaxAttention keeps no streaming state: pass the whole sequence")
        B, T, _ = x.shape
        h = self.qkv(x)
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)
        h = causal_conv(h, None, self.conv)
        q, k, v = h.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._allowed(T, mask, x.device))
        o = o.transpose(1, 2).reshape(B, T, -1)
        if mask is not None:
            o = o * mask[..., None].to(o.dtype)
        return self.out(o), None
