"""Fast-weight token mixers: linear attention, the delta rule and the gated delta rule.

Shapes: B batch, H heads, T tokens; q, k (B, H, T, dk); v (B, H, T, dv); beta, decay (B, H, T);
state S (B, H, dv, dk) so that the read is o_t = S_t q_t (causal, the current token included).

    linear       S_t = S_{t-1} + v_t k_t^T
    delta        S_t = S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T
    gated delta  S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T          (decay None: a_t = 1)

The delta rule is one step of online gradient descent with step b_t on ||S k_t - v_t||^2 / 2; with
b_t = 1 and a unit k_t the new write replaces what the memory held for k_t.

Chunked (WY / UT-transform) form of the gated delta rule. Work with M = S^T (dk x dv), so that
M_t = a_t (I - b_t k_t k_t^T) M_{t-1} + b_t k_t v_t^T and o_t^T = q_t^T M_t. In a chunk of C tokens
with start state M0, let g_t = sum_{i<=t} log a_i (cumsum inside the chunk) and
Gamma[t, i] = exp(g_t - g_i) for i <= t, 0 otherwise (masked to -inf before the exp, so no
overflow). Unrolling shows M_t = exp(g_t) M0 + sum_{i<=t} Gamma[t, i] k_i e_i^T with
pseudo-values e_t = b_t (v_t - a_t M_{t-1}^T k_t), i.e.

    e_t = b_t (v_t - exp(g_t) M0^T k_t - sum_{i<t} Gamma[t, i] (k_t . k_i) e_i)

which in matrix form (rows = tokens) is a unit lower-triangular system:

    A     = strictly_lower( diag(b) (K K^T ⊙ Gamma) )
    E     = (I + A)^{-1} diag(b) (V - diag(exp g) K M0)                 (triangular solve)
    O     = diag(exp g) Q M0 + lower_incl_diag(Q K^T ⊙ Gamma) E
    M_end = exp(g_C) M0 + (K ⊙ exp(g_C - g))^T E

E splits as U - W M0 with U = (I + A)^{-1} diag(b) V and W = (I + A)^{-1} diag(b exp g) K, which
depend on the chunk only: they are computed for all chunks at once (one triangular solve for
[U, W]). The chunk-to-chunk map is affine, M_end = F M0 + R with F = exp(g_C) I - K_end^T W and
R = K_end^T U (K_end = K ⊙ exp(g_C - g)), so the loop over chunks (never over tokens) is one small
matmul per chunk; afterwards every chunk's output O = P U + (diag(exp g) Q - P W) M0 is computed at
once. Where the chunk's decay span is moderate, Q K^T ⊙ Gamma = tril((e^g ⊙ Q)(e^{-g} ⊙ K)^T) needs
no C x C exp (see :func:`_chunk_solve`). T is padded to a multiple of the chunk size with b = 0,
a = 1 (state untouched) and sliced back. Everything is differentiable, initial_state included.

Numerics: state math runs in float32 (or float64 for float64 inputs) with autocast disabled;
outputs are cast back to v.dtype and the final state stays in the compute dtype.
Padding masks (B, T), True / 1 at real tokens: masked tokens get b = 0, a = 1 (and k = 0 for the
additive rule), so they never change the state, and their outputs are zeroed.

:class:`FastWeightAttention` wraps a kernel as a layer:

    q, k, v = SiLU(causal_depthwise_conv([W_q x, W_k x, W_v x]))   (conv cache carried in the state)
    q, k   <- q / ||q||, k / ||k|| per head                          (qk_norm)
    b_t = sigmoid(W_b x_t),  a_t = sigmoid(W_a x_t + c)              (per head; c sets a ~ 0.9..0.99)
    y_t = W_o RMSNorm_head(o_t)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
RULES = ("linear", "delta", "gated_delta")
MODES = ("chunked", "recurrent")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs are float64 (for float64 references)."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(x: Tensor):
    """State math never runs in reduced precision, even inside a caller's autocast region."""
    return torch.autocast(device_type=x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
        else contextlib.nullcontext()


def _mask3(mask: Tensor | None, ref: Tensor) -> Tensor | None:
    """(B, T) mask -> (B, 1, T) in ref's dtype, broadcasting over heads."""
    return None if mask is None else mask.to(device=ref.device, dtype=ref.dtype)[:, None, :]


def _gates(beta: Tensor, decay: Tensor | None, log_decay: Tensor | None, mask: Tensor | None,
           dt: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """beta (B, H, T) and log a (B, H, T) or None, in dt, with masked tokens set to b = 0, log a = 0."""
    if decay is not None and log_decay is not None:
        raise ValueError("pass decay or log_decay, not both")
    b = beta.to(dt)
    la = None
    if log_decay is not None:
        la = log_decay.to(dt)
    elif decay is not None:
        la = torch.log(decay.to(dt).clamp_min(torch.finfo(dt).tiny))
    m = _mask3(mask, b)
    if m is not None:
        b = b * m
        if la is not None:
            la = la * m
    return b, la


def _initial(initial_state: Tensor | None, B: int, H: int, dv: int, dk: int, like: Tensor) -> Tensor:
    if initial_state is None:
        return like.new_zeros(B, H, dv, dk)
    if initial_state.shape != (B, H, dv, dk):
        raise ValueError(f"initial_state must be {(B, H, dv, dk)} (B, H, dv, dk), got {tuple(initial_state.shape)}")
    return initial_state.to(like.dtype)


def _pad_time(x: Tensor, pad: int, dim: int = 2) -> Tensor:
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _chunks(x: Tensor, n: int, c: int) -> Tensor:
    """(B, H, n*c, ...) -> (B, H, n, c, ...)."""
    return x.reshape(*x.shape[:2], n, c, *x.shape[3:])


# ----------------------------------------------------------------------------------------------
# linear attention (additive rule)
# ----------------------------------------------------------------------------------------------

def linear_attention(q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None = None,
                     chunk_size: int | None = None, *, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """S_t = S_{t-1} + v_t k_t^T, o_t = S_t q_t. Returns (o (B, H, T, dv), S_T (B, H, dv, dk)).

    chunk_size None: O = tril_incl(Q K^T) V + Q M0 over the whole sequence (one masked matmul);
    otherwise per chunk O_c = Q_c M + tril_incl(Q_c K_c^T) V_c, M <- M + K_c^T V_c.
    """
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    out_dtype, dt = v.dtype, _compute_dtype(v.dtype)
    with _no_autocast(q):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        m = _mask3(mask, k)
        if m is not None:
            k = k * m[..., None]
        M = _initial(initial_state, B, H, dv, dk, k).transpose(-1, -2)
        if chunk_size is None or chunk_size >= T:
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            o = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0) @ v + q @ M
            M = M + k.transpose(-1, -2) @ v
        else:
            c = int(chunk_size)
            if c < 1:
                raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
            n = math.ceil(T / c)
            pad = n * c - T
            qc, kc, vc = (_chunks(_pad_time(x, pad), n, c) for x in (q, k, v))
            causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
            intra = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0) @ vc  # all chunks at once
            outs = []
            for i in range(n):
                outs.append(intra[:, :, i] + qc[:, :, i] @ M)
                M = M + kc[:, :, i].transpose(-1, -2) @ vc[:, :, i]
            o = torch.cat(outs, dim=2)[:, :, :T]
        if m is not None:
            o = o * m[..., None]
    return o.to(out_dtype), M.transpose(-1, -2)


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None = None,
                               *, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token reference of :func:`linear_attention`: S_t = S_{t-1} + v_t k_t^T, o_t = S_t q_t."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    out_dtype, dt = v.dtype, _compute_dtype(v.dtype)
    with _no_autocast(q):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        m = _mask3(mask, k)
        if m is not None:
            k = k * m[..., None]
        S = _initial(initial_state, B, H, dv, dk, k)
        outs = []
        for t in range(T):
            S = S + v[:, :, t, :, None] * k[:, :, t, None, :]
            outs.append((S @ q[:, :, t, :, None])[..., 0])
        o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, dv)
        if m is not None:
            o = o * m[..., None]
    return o.to(out_dtype), S


# ----------------------------------------------------------------------------------------------
# delta rule / gated delta rule
# ----------------------------------------------------------------------------------------------

def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, decay: Tensor | None = None,
                         initial_state: Tensor | None = None, *, mask: Tensor | None = None,
                         log_decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token reference: S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t q_t.

    Written as S' = a_t S_{t-1}; S_t = S' + b_t (v_t - S' k_t) k_t^T. decay (a) None: a = 1;
    log_decay may be given instead of decay (more precise for a close to 1).
    """
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    out_dtype, dt = v.dtype, _compute_dtype(v.dtype)
    with _no_autocast(q):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        b, la = _gates(beta, decay, log_decay, mask, dt)
        S = _initial(initial_state, B, H, dv, dk, k)
        outs = []
        for t in range(T):
            if la is not None:
                S = S * la[:, :, t, None, None].exp()
            kt = k[:, :, t]
            err = v[:, :, t] - (S @ kt[..., None])[..., 0]                      # v_t - S' k_t
            S = S + (b[:, :, t, None] * err)[..., :, None] * kt[..., None, :]
            outs.append((S @ q[:, :, t, :, None])[..., 0])
        o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, dv)
        m = _mask3(mask, o)
        if m is not None:
            o = o * m[..., None]
    return o.to(out_dtype), S


# Largest within-chunk log-decay span -g_C for which Gamma is factored as e^{g_t} e^{-g_i} (beyond
# it e^{-g} could overflow, so the masked exp of g_t - g_i is used instead).
_FACTOR_SPAN = {torch.float32: 40.0, torch.float64: 300.0}


def _graph_capture() -> bool:
    """Whether a graph is being captured (torch.export, torch.jit.trace, torch.compile)."""
    compiler = getattr(torch, "compiler", None)
    return bool(torch.jit.is_tracing() or (compiler is not None and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)())))


def _chunk_prep(q: Tensor | None, k: Tensor, v: Tensor, b: Tensor, g: Tensor):
    """Chunk-local parts of the WY form, for any leading dims: (..., C, d) inputs, g (..., C).

    Returns U, W (E = U - W M0), P = lower_incl(Q K^T ⊙ Gamma) (or None), exp(g), and the key
    weights K ⊙ exp(g_C - g) used by the state update (see :func:`_chunk_solve`).
    """
    X, P, eg, k_end = _chunk_solve(q, k, v, b, g)
    return X[..., : v.shape[-1]], X[..., v.shape[-1]:], P, eg, k_end


def _chunk_solve(q: Tensor | None, k: Tensor, v: Tensor, b: Tensor, g: Tensor):
    """:func:`_chunk_prep` with U and W still side by side: X = [U, W] (..., C, dv + dk).

    Gamma[t, i] = e^{g_t - g_i} is a rank-one outer product on the lower triangle, so where the
    chunk's decay span allows (every -g_C <= _FACTOR_SPAN), (Q K^T) ⊙ Gamma = tril((e^g ⊙ Q)(e^{-g} ⊙ K)^T)
    and no C x C exp or elementwise product is formed (the check is one host sync per call).
    Otherwise Gamma is the masked exp of g_t - g_i (masked to -inf above the diagonal before the
    exp). The two paths are equal up to float rounding.
    """
    C = k.shape[-2]
    eg = g.exp()
    span = _FACTOR_SPAN.get(g.dtype, 0.0)
    if _graph_capture():  # torch.export / jit.trace / compile: no host sync, the path valid for any span
        factored = False
    else:
        factored = g.numel() == 0 or float(-g[..., -1].detach().min()) <= span
    # A and the right-hand side are built transposed (A^T, rhs^T contiguous), so that A and rhs are
    # column-major, as the triangular solve (LAPACK) wants them: no copies inside the solve.
    if factored:
        kl, kr = k * eg[..., None], k * (-g).exp()[..., None]
        AT = kr @ kl.transpose(-1, -2)                                   # (K K^T ⊙ Gamma)^T
        P = None if q is None else ((q * eg[..., None]) @ kr.transpose(-1, -2)).tril_()
    else:
        upper = torch.ones(C, C, dtype=torch.bool, device=k.device).triu(1)
        gamma = (g[..., :, None] - g[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
        AT = (k @ k.transpose(-1, -2) * gamma).transpose(-1, -2)
        P = None if q is None else (q @ k.transpose(-1, -2)) * gamma
    A = AT.mul_(b[..., None, :]).mT.tril_(-1)                            # diag(b) (K K^T ⊙ Gamma), strict
    A.diagonal(dim1=-2, dim2=-1).fill_(1.0)                              # I + A, unit lower-triangular
    rhs = torch.cat([v.transpose(-1, -2), (eg[..., None] * k).transpose(-1, -2)], dim=-2).mul_(b[..., None, :]).mT
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    k_end = k * (g[..., -1:] - g).exp_()[..., None]
    return X, P, eg, k_end


def _chunk_apply(M: Tensor, U: Tensor, W: Tensor, q: Tensor | None, P: Tensor | None, eg: Tensor,
                 k_end: Tensor) -> tuple[Tensor | None, Tensor]:
    """One chunk from M0 = M (dk x dv form): E = U - W M0, O, M_end."""
    E = U - W @ M
    O = None if q is None else (eg[..., None] * q) @ M + P @ E
    M = eg[..., -1, None, None] * M + k_end.transpose(-1, -2) @ E
    return O, M


def delta_rule_chunk_step(k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None, state: Tensor,
                          q: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """One chunk of the gated delta rule in the WY form, for any leading dims.

    k (..., C, dk), v (..., C, dv), beta / log_decay (..., C), state S0 (..., dv, dk), optional
    q (..., C, dk). Returns (o (..., C, dv) or None, S_end (..., dv, dk)); same equations as
    :func:`delta_rule_chunked` for a single chunk; dtypes are the caller's (no casting).
    """
    g = torch.zeros_like(beta) if log_decay is None else log_decay.cumsum(-1)
    U, W, P, eg, k_end = _chunk_prep(q, k, v, beta, g)
    o, M = _chunk_apply(state.transpose(-1, -2), U, W, q, P, eg, k_end)
    return o, M.transpose(-1, -2)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, decay: Tensor | None = None,
                       initial_state: Tensor | None = None, chunk_size: int = 64, *, mask: Tensor | None = None,
                       log_decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked (WY / UT-transform) delta rule, equal to :func:`delta_rule_recurrent` (see module doc)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype, dt = v.dtype, _compute_dtype(v.dtype)
    with _no_autocast(q):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        b, la = _gates(beta, decay, log_decay, mask, dt)
        M = _initial(initial_state, B, H, dv, dk, k).transpose(-1, -2)
        c = min(int(chunk_size), max(T, 1))
        n = math.ceil(T / c)
        pad = n * c - T
        if la is None:
            la = torch.zeros_like(b)
        # padding: q = k = v = 0, b = 0, log a = 0 -> the state is untouched
        qc, kc, vc = (_chunks(_pad_time(x, pad), n, c) for x in (q, k, v))
        bc, lac = (_chunks(_pad_time(x, pad), n, c) for x in (b, la))
        X, P, eg, k_end = _chunk_solve(qc, kc, vc, bc, lac.cumsum(-1))    # all chunks in parallel
        # X = [U, W]. Chunk-to-chunk state map M_{i+1} = F_i M_i + R_i with [R_i, -F_i + e^{g_C} I] =
        # K_end^T [U, W] (one matmul for all chunks); the loop over chunks is then one small matmul
        # each, and the outputs O_i = diag(e^g) Q_i M_i + P_i (U_i - W_i M_i)
        #                           = P_i U_i + (diag(e^g) Q_i - P_i W_i) M_i
        # come after it, for all chunks at once ([P U, P W] = P X: one matmul).
        RF = k_end.transpose(-1, -2) @ X                                   # (B, H, n, dk, dv + dk)
        R, F_ = RF[..., :dv], RF[..., dv:]
        F_.neg_().diagonal(dim1=-2, dim2=-1).add_(eg[..., -1, None])
        F_ = F_.movedim(2, 0).reshape(n, B * H, dk, dk)                    # chunk-major, contiguous
        R = R.movedim(2, 0).reshape(n, B * H, dk, dv)
        starts = []
        M = M.reshape(B * H, dk, dv)
        for i in range(n):                                                 # loop over chunks only
            starts.append(M.view(B, H, dk, dv))
            M = torch.baddbmm(R[i], F_[i], M)
        M = M.view(B, H, dk, dv)
        if n:
            Ms = torch.stack(starts, dim=2)                                # (B, H, n, dk, dv) chunk-start states
            PX = P @ X
            Qeff = torch.addcmul(-PX[..., dv:], eg[..., None], qc)        # diag(e^g) Q - P W
            o = (Qeff @ Ms).add_(PX[..., :dv]).view(B, H, n * c, dv)[:, :, :T]
        else:
            o = v.new_zeros(B, H, 0, dv)
        m = _mask3(mask, o)
        if m is not None:
            o = o * m[..., None]
    return o.to(out_dtype), M.transpose(-1, -2)


def fast_weight_mix(rule: str, mode: str, q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None,
                    log_decay: Tensor | None, initial_state: Tensor | None, chunk_size: int,
                    mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch to the kernel of a rule ("linear" | "delta" | "gated_delta") and mode ("chunked" | "recurrent")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if rule == "linear":
        if mode == "chunked":
            return linear_attention(q, k, v, initial_state, chunk_size, mask=mask)
        return linear_attention_recurrent(q, k, v, initial_state, mask=mask)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    la = log_decay if rule == "gated_delta" else None
    if mode == "chunked":
        return delta_rule_chunked(q, k, v, beta, None, initial_state, chunk_size, mask=mask, log_decay=la)
    return delta_rule_recurrent(q, k, v, beta, None, initial_state, mask=mask, log_decay=la)


# ----------------------------------------------------------------------------------------------
# layer pieces shared with HOPE
# ----------------------------------------------------------------------------------------------

@dataclass
class FastWeightState:
    """Streaming state of a fast-weight layer.

    memory: (B, H, dv, dk) fast-weight matrix S (float32, or float64 for float64 inputs).
    conv:   (B, conv_size - 1, 3 * H * dh) the last pre-convolution q/k/v inputs of real tokens
            (None without a convolution), so that a continuation sees the same causal window.
    """

    memory: Tensor
    conv: Tensor | None = None


def causal_conv(pre: Tensor, cache: Tensor | None, conv: nn.Conv1d | None) -> Tensor:
    """SiLU(depthwise causal conv) of pre (B, T, C), left context = cache (B, K-1, C) or zeros."""
    if conv is None:
        return pre
    K = conv.kernel_size[0]
    if cache is None:
        cache = pre.new_zeros(pre.shape[0], K - 1, pre.shape[-1])
    seq = torch.cat([cache.to(pre.dtype), pre], dim=1).transpose(1, 2)
    return F.silu(F.conv1d(seq, conv.weight, conv.bias, groups=conv.groups).transpose(1, 2))


def conv_tail(cache: Tensor | None, pre: Tensor, mask: Tensor | None, K: int) -> Tensor | None:
    """The last K-1 pre-conv inputs among [cache; real tokens of pre] (padding skipped, any side)."""
    if K <= 1:
        return None
    B, T, C = pre.shape
    if cache is None:
        cache = pre.new_zeros(B, K - 1, C)
    seq = torch.cat([cache.to(pre.dtype), pre], dim=1)
    if mask is None:
        return seq[:, -(K - 1):]
    keep = torch.cat([torch.ones(B, K - 1, dtype=torch.int32, device=pre.device), mask.to(pre.device).int()], dim=1)
    order = torch.argsort(keep, dim=1, stable=True)[:, -(K - 1):]   # pads first, real tokens in order
    return seq.gather(1, order[..., None].expand(-1, -1, C))


def head_rms_norm(o: Tensor, weight: Tensor, eps: float) -> Tensor:
    """o (..., dh) / rms(o) * weight, computed in at least float32 and returned in o.dtype."""
    o32 = o.to(_compute_dtype(o.dtype))
    return (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype) * weight.to(o.dtype)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ||x|| over the last dim in at least float32."""
    x32 = x.to(_compute_dtype(x.dtype))
    return x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)


def decay_bias_init(n_heads: int, low: float = 0.9, high: float = 0.99) -> Tensor:
    """Per-head gate biases c with sigmoid(c) spread over [low, high]."""
    a = torch.linspace(low, high, n_heads) if n_heads > 1 else torch.tensor([(low + high) / 2])
    return torch.log(a) - torch.log1p(-a)


# ----------------------------------------------------------------------------------------------
# layer
# ----------------------------------------------------------------------------------------------

class FastWeightAttention(nn.Module):
    """Multi-head fast-weight attention layer (linear / delta / gated delta rule), see module doc.

    forward(x (B, T, d_model), mask (B, T) or None, state or None, mode "chunked" | "recurrent")
    -> (y (B, T, d_model), FastWeightState). One pass equals any split into calls that carry the state.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, rule: str = "gated_delta",
                 conv_size: int = 4, chunk_size: int = 64, qk_norm: bool = True, bias: bool = False,
                 norm_eps: float = 1e-6):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.rule, self.chunk_size, self.qk_norm, self.norm_eps = rule, chunk_size, qk_norm, norm_eps
        self.conv_size = conv_size
        inner = n_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_size, groups=3 * inner) if conv_size > 1 else None
        self.b_proj = nn.Linear(d_model, n_heads, bias=bias) if rule != "linear" else None
        self.a_proj = None
        if rule == "gated_delta":
            self.a_proj = nn.Linear(d_model, n_heads, bias=True)
            with torch.no_grad():
                self.a_proj.weight.mul_(0.1)               # start close to the bias-set decay
                self.a_proj.bias.copy_(decay_bias_init(n_heads))
        self.o_norm = nn.Parameter(torch.ones(self.head_dim))
        self.out_proj = nn.Linear(inner, d_model, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, H*dh) -> (B, H, T, dh)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def gates(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """b (B, H, T) in (0, 1) and log a (B, H, T) (a in (0, 1)), at least float32; None where the rule has none."""
        b = la = None
        if self.b_proj is not None:
            zb = self.b_proj(x)
            b = torch.sigmoid(zb.to(_compute_dtype(zb.dtype))).transpose(1, 2)
        if self.a_proj is not None:
            za = self.a_proj(x)
            la = F.logsigmoid(za.to(_compute_dtype(za.dtype))).transpose(1, 2)
        return b, la

    def forward(self, x: Tensor, mask: Tensor | None = None, state: FastWeightState | None = None,
                mode: str | None = "chunked") -> tuple[Tensor, FastWeightState]:
        mode = mode or "chunked"
        pre = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if mask is not None:
            pre = pre * mask[..., None].to(pre.dtype)
        cache = None if state is None else state.conv
        h = causal_conv(pre, cache, self.conv)
        q, k, v = (self._heads(t) for t in h.chunk(3, dim=-1))
        if self.qk_norm:
            q, k = l2_normalize(q), l2_normalize(k)
        b, la = self.gates(x)
        o, S = fast_weight_mix(self.rule, mode, q, k, v, b, la, None if state is None else state.memory,
                               self.chunk_size, mask)
        o = head_rms_norm(o, self.o_norm, self.norm_eps)
        y = self.out_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y, FastWeightState(S, conv_tail(cache, pre, mask, self.conv_size if self.conv is not None else 1))
