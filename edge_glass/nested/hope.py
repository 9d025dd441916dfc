"""HOPE-style attention with self-modifying projections (Nested Learning, Behrouz et al. 2025).

A gated-delta fast-weight layer (:mod:`edge_glass.nested.fast_weights`) whose key / value / gate
projections are themselves linear fast-weight memories ("self-modifying Titans"). Per head, with
c_t = (W_in x_t)_head in R^dh (a static input projection) and the projection memories

    P = [M_k; M_v; M_b; M_a]   ((2 dh + 2) x dh: M_k, M_v dh x dh; M_b, M_a 1 x dh),

initialised from learned slow weights P_0 and READ BEFORE WRITE (a token is projected with the
memories' state before its chunk's update):

    k~_t = M_k c_t,  v~_t = M_v c_t,  b_t = sigmoid(M_b c_t [+ c_b]),  a_t = sigmoid(M_a c_t + c_a)
    q, k, v = SiLU(causal_depthwise_conv([W_q x_t, k~_t, v~_t])),  q, k <- q / ||q||, k / ||k||

Main memory (as FastWeightAttention, rule "gated_delta"):

    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,   y_t = W_o RMSNorm_head(S_t q_t)

Each projection memory M (any block of P) is written by the same gated delta rule, with the
token's (normalised) key k_t, gates b_t, a_t and a self-generated target v^_t = M_prev v_t, the
memory applied to the token's own value (self-referential values):

    M_t = a_t M_{t-1} (I - b_t k_t k_t^T) + b_t v^_t k_t^T

Granularity: in "chunked" mode the projection memories advance once per chunk of C tokens: all
tokens of a chunk are projected with (and take their targets v^ from) the chunk-start memories,
then the chunk's writes are applied with the WY single-chunk step
(:func:`~edge_glass.nested.fast_weights.delta_rule_chunk_step`); the main memory runs the chunked
gated-delta kernel. The sequence loop is over chunks only. "recurrent" mode is the per-token
recurrence (C = 1, rank-1 updates) and equals "chunked" mode with chunk_size = 1. The state
(HopeState: main memory, projection memories, conv cache) is carried across calls, so one pass
equals two calls whenever the split falls on a chunk boundary. Everything is differentiable: the
slow weights (W_in, P_0, W_q, conv, ...) train by backprop through the in-context updates.

self_modifying=False freezes P = P_0 (plain static projections, for ablation): the layer is then
exactly a gated-delta FastWeightAttention with W_k = blockdiag(M_k0) W_in, W_v = blockdiag(M_v0) W_in,
W_b = M_b0 W_in, W_a = M_a0 W_in (per head) and the same other weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fast_weights import (FastWeightState, _compute_dtype, _no_autocast, causal_conv, conv_tail, decay_bias_init,
                           delta_rule_chunk_step, fast_weight_mix, head_rms_norm, l2_normalize)

Tensor = torch.Tensor


@dataclass
class HopeState(FastWeightState):
    """FastWeightState plus the projection memories: projections (B, H, 2 dh + 2, dh), rows
    [M_k (dh); M_v (dh); M_b (1); M_a (1)], float32 (None: start from the slow weights)."""

    projections: Tensor | None = None


class HopeAttention(nn.Module):
    """Gated-delta attention whose k / v / b / a projections are in-context fast-weight memories (module doc)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, conv_size: int = 4,
                 chunk_size: int = 64, qk_norm: bool = True, bias: bool = False, self_modifying: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = dh = head_dim or d_model // n_heads
        self.chunk_size, self.qk_norm, self.norm_eps = chunk_size, qk_norm, norm_eps
        self.self_modifying, self.conv_size = self_modifying, conv_size
        inner = n_heads * dh
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.in_proj = nn.Linear(d_model, inner, bias=bias)
        # slow weights = initial projection memories, per head (out x in)
        self.mem_k = nn.Parameter(torch.empty(n_heads, dh, dh))
        self.mem_v = nn.Parameter(torch.empty(n_heads, dh, dh))
        self.mem_b = nn.Parameter(torch.empty(n_heads, 1, dh))
        self.mem_a = nn.Parameter(torch.empty(n_heads, 1, dh))
        for h in range(n_heads):
            nn.init.orthogonal_(self.mem_k.data[h])
            nn.init.orthogonal_(self.mem_v.data[h])
        nn.init.uniform_(self.mem_b, -dh ** -0.5, dh ** -0.5)
        nn.init.uniform_(self.mem_a, -0.1 * dh ** -0.5, 0.1 * dh ** -0.5)   # start close to the bias-set decay
        self.b_bias = nn.Parameter(torch.zeros(n_heads)) if bias else None
        self.a_bias = nn.Parameter(decay_bias_init(n_heads))
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_size, groups=3 * inner) if conv_size > 1 else None
        self.o_norm = nn.Parameter(torch.ones(dh))
        self.out_proj = nn.Linear(inner, d_model, bias=bias)

    def initial_projections(self) -> Tensor:
        """P_0 (H, 2 dh + 2, dh): rows [M_k; M_v; M_b; M_a]."""
        return torch.cat([self.mem_k, self.mem_v, self.mem_b, self.mem_a], dim=1)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        """(B, H, T, dh) -> (B, T, H*dh)."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    @staticmethod
    def _write(P: Tensor, k: Tensor, v: Tensor, b: Tensor, la: Tensor, mode: str) -> Tensor:
        """Gated delta writes of one chunk into the projection memories P (B, H, R, dh), target v^ = P v."""
        with _no_autocast(P):
            k, v, b, la = k.to(P.dtype), v.to(P.dtype), b.to(P.dtype), la.to(P.dtype)
            vhat = v @ P.transpose(-1, -2)                    # self-generated targets M_prev v_t
            if mode == "recurrent":                           # one token: rank-1 update
                P = P * la[..., 0, None, None].exp()          # P' = a P
                k0 = k[:, :, 0]
                err = vhat[:, :, 0] - (P @ k0[..., None])[..., 0]
                return P + (b[:, :, 0, None] * err)[..., :, None] * k0[..., None, :]
            return delta_rule_chunk_step(k, vhat, b, la, P)[1]   # WY single-chunk step

    def forward(self, x: Tensor, mask: Tensor | None = None, state: HopeState | None = None,
                mode: str | None = "chunked") -> tuple[Tensor, HopeState]:
        mode = mode or "chunked"
        if mode not in ("chunked", "recurrent"):
            raise ValueError(f"mode must be 'chunked' or 'recurrent', got {mode!r}")
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("HopeAttention needs at least one token")
        dh = self.head_dim
        m = None if mask is None else mask.to(x.device)[..., None]
        qt = self.q_proj(x)
        c = self.in_proj(x)
        if m is not None:
            qt, c = qt * m.to(qt.dtype), c * m.to(c.dtype)
        c = self._heads(c)                                                          # (B, H, T, dh)
        P = state.projections if state is not None and state.projections is not None else None
        if P is None:
            P = self.initial_projections()[None].expand(B, -1, -1, -1)              # (B, H, R, dh)
        dt = _compute_dtype(torch.promote_types(P.dtype, c.dtype))
        P = P.to(dt)
        cache = None if state is None else state.conv
        buf = cache
        step = 1 if mode == "recurrent" else self.chunk_size
        if not self.self_modifying:
            step = max(T, 1)                                  # static projections: one pass
        pieces: dict[str, list[Tensor]] = {n: [] for n in ("q", "k", "v", "b", "la", "pre")}
        for s in range(0, T, step):                           # loop over chunks (tokens in recurrent mode)
            e = min(s + step, T)
            with _no_autocast(x):                             # read before write: (B, H, C, R)
                r = c[:, :, s:e].to(dt) @ P.transpose(-1, -2)
            kt, vt, zb, za = r.split([dh, dh, 1, 1], dim=-1)
            pre = torch.cat([qt[:, s:e], self._merge(kt).to(qt.dtype), self._merge(vt).to(qt.dtype)], dim=-1)
            if m is not None:
                pre = pre * m[:, s:e].to(pre.dtype)
            h = causal_conv(pre, buf, self.conv)
            if self.conv is not None:
                buf = torch.cat([buf if buf is not None else pre.new_zeros(B, self.conv_size - 1, pre.shape[-1]),
                                 pre], dim=1)[:, -(self.conv_size - 1):].to(pre.dtype)
            q, k, v = (self._heads(t) for t in h.chunk(3, dim=-1))
            if self.qk_norm:
                q, k = l2_normalize(q), l2_normalize(k)
            zb = zb[..., 0] if self.b_bias is None else zb[..., 0] + self.b_bias[:, None]
            b = torch.sigmoid(zb.to(dt))
            la = F.logsigmoid((za[..., 0] + self.a_bias[:, None]).to(dt))
            if m is not None:
                keep = mask.to(x.device)[:, None, s:e].to(b.dtype)
                b, la = b * keep, la * keep
            if self.self_modifying:
                P = self._write(P, k, v, b, la, mode)
            for name, t in (("q", q), ("k", k), ("v", v), ("b", b), ("la", la), ("pre", pre)):
                pieces[name].append(t)
        cat = {n: torch.cat(ts, dim=1 if n == "pre" else 2) for n, ts in pieces.items()}
        o, S = fast_weight_mix("gated_delta", mode, cat["q"], cat["k"], cat["v"], cat["b"], cat["la"],
                               None if state is None else state.memory, self.chunk_size, mask)
        o = head_rms_norm(o, self.o_norm, self.norm_eps)
        y = self.out_proj(self._merge(o))
        if m is not None:
            y = y * m.to(y.dtype)
        conv = conv_tail(cache, cat["pre"], mask, self.conv_size if self.conv is not None else 1)
        return y, HopeState(S, conv, P)
