"""Titans-style linear neural memory with momentum ("surprise"), recurrent reference form.

State per head: a matrix memory M (dv x dk) and its momentum U (dv x dk). Inner loss and its
closed-form gradient (the "surprise" signal):

    l(M; k, v)   = ||M k - v||^2 / 2
    grad_M l     = (M k - v) k^T

Update per token t (eta_t momentum, theta_t inner learning rate, alpha_t forgetting):

    U_t = eta_t U_{t-1} - theta_t grad_M l(M_{t-1}; k_t, v_t)
    M_t = (1 - alpha_t) M_{t-1} + U_t
    o_t = M_t q_t                                        (read AFTER write, as in the delta rule)

With eta = 0 and alpha = 0 this is M_t = M_{t-1} (I - theta_t k_t k_t^T) + theta_t v_t k_t^T, the
delta rule of :func:`~edge_glass.nested.fast_weights.delta_rule_recurrent` with b_t = theta_t.
Shapes follow fast_weights: q, k (B, H, T, dk), v (B, H, T, dv), theta / eta / alpha (B, H, T).
State math runs in float32 (float64 for float64 inputs). A masked token (mask (B, T) False) leaves
M and U unchanged (momentum included) and its output is zeroed.

Chunked form (:func:`titans_memory_chunked`, exact, parallel within a chunk). The update is linear
in the pair X = [M, U] (dv x 2dk): with e_t = v_t - M_{t-1} k_t (the negative surprise direction),
a_t = 1 - alpha_t,

    [M_t, U_t] = [M_{t-1}, U_{t-1}] (D_t ⊗ I) + theta_t e_t [k_t^T, k_t^T],   D_t = [[a_t, 0], [eta_t, eta_t]]

(rows of D: from M, from U; columns: to M, to U). D_t is a 2 x 2 lower-triangular matrix, so
products over a chunk are cheap: for tokens i < t, [1, 1] D_{i+1} ... D_t = [g^M_{t,i}, g^U_{t,i}] with

    g^U_{t,i} = prod_{j=i+1}^t eta_j
    g^M_{t,i} = prod_{j=i+1}^t a_j + sum_{m=i+1}^t (prod_{j=m+1}^t a_j) eta_m (prod_{j=i+1}^{m-1} eta_j)

(all pairs at once: segment products by a masked cumprod, the sum as one C x C matmul). Unrolling
from the chunk-start state (M_0, U_0) gives M_t = rho_t M_0 + sigma_t U_0 + sum_{i<=t} g^M_{t,i}
theta_i e_i k_i^T (rho, sigma: the same products from the chunk start), so e solves a unit
lower-triangular system, as in the delta rule's WY form (fast_weights, transposed N = M^T, rows =
tokens):

    (I + strict_tril(K K^T ⊙ G^M_prev) diag(theta)) E = V - diag(rho_prev) K N_0 - diag(sigma_prev) K U_0^T
    O     = diag(rho) Q N_0 + diag(sigma) Q U_0^T + (Q K^T ⊙ tril(G^M)) diag(theta) E
    N_C   = rho_C N_0 + sigma_C U_0^T + (K ⊙ g^M_{C,:} theta)^T E
    U_C^T = (prod eta) U_0^T + (K ⊙ g^U_{C,:} theta)^T E

(G^M_prev[t, i] = g^M_{t-1, i}). The chunk-local solves run for all chunks at once; the loop runs
over chunks only. A masked or padding token has theta = 0 and the identity D (a = 1 and no U -> M
coupling), so it changes nothing. Gradients flow to every input and to the initial state.

Deep memory: a Titans MLP memory M(k) = W_2 act(W_1 k) has a gradient that is nonlinear in the
weights at M_{t-1}, so there is no such triangular system: its exact per-token update has no
chunked form. Titans' own parallel training takes every gradient of a chunk at the chunk-start
weights (mini-batch gradient descent), a different update. Only the linear memory is implemented
here, in both forms; a deep memory would need the recurrent form (or the mini-batch approximation,
stated as such).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fast_weights import _chunks, _compute_dtype, _no_autocast, _pad_time

Tensor = torch.Tensor


@dataclass
class TitansState:
    memory: Tensor     # M (B, H, dv, dk)
    momentum: Tensor   # U (B, H, dv, dk)


def memory_loss(M: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """l(M; k, v) = ||M k - v||^2 / 2 for M (..., dv, dk), k (..., dk), v (..., dv) -> (...)."""
    return 0.5 * ((M @ k[..., None])[..., 0] - v).pow(2).sum(-1)


def memory_grad(M: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Closed-form grad_M l(M; k, v) = (M k - v) k^T -> (..., dv, dk)."""
    err = (M @ k[..., None])[..., 0] - v
    return err[..., :, None] * k[..., None, :]


def titans_memory_recurrent(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor | None = None,
                            alpha: Tensor | None = None, initial_state: TitansState | None = None, *,
                            mask: Tensor | None = None) -> tuple[Tensor, TitansState]:
    """Per-token Titans memory (see module doc). eta / alpha None mean 0. Returns (o, TitansState)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    out_dtype, dt = v.dtype, _compute_dtype(v.dtype)
    with _no_autocast(q):
        q, k, v, theta = q.to(dt), k.to(dt), v.to(dt), theta.to(dt)
        eta = None if eta is None else eta.to(dt)
        alpha = None if alpha is None else alpha.to(dt)
        if initial_state is None:
            M, U = k.new_zeros(B, H, dv, dk), k.new_zeros(B, H, dv, dk)
        else:
            M, U = initial_state.memory.to(dt), initial_state.momentum.to(dt)
        keep = None if mask is None else mask.to(q.device).bool()[:, None, None, None].expand(B, H, 1, 1, T)
        outs = []
        for t in range(T):
            grad = memory_grad(M, k[:, :, t], v[:, :, t])
            U_new = -theta[:, :, t, None, None] * grad
            if eta is not None:
                U_new = U_new + eta[:, :, t, None, None] * U
            M_new = M + U_new if alpha is None else (1 - alpha[:, :, t, None, None]) * M + U_new
            if keep is not None:
                kt = keep[..., t]
                U_new, M_new = torch.where(kt, U_new, U), torch.where(kt, M_new, M)
            M, U = M_new, U_new
            outs.append((M @ q[:, :, t, :, None])[..., 0])   # read after write
        o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, dv)
        if mask is not None:
            o = o * mask.to(o.device, o.dtype)[:, None, :, None]
    return o.to(out_dtype), TitansState(M, U)


# ----------------------------------------------------------------------------------------------
# chunked form
# ----------------------------------------------------------------------------------------------

def _segment_products(x: Tensor) -> Tensor:
    """x (..., C) -> P (..., C, C), P[t, i] = prod_{j=i+1}^{t} x_j for i <= t (1 on the diagonal), 0 above.

    A cumprod down each column of [x_t if t > i else 1]: exact with zeros (no logs), differentiable.
    """
    C = x.shape[-1]
    idx = torch.arange(C, device=x.device)
    strict = idx[:, None] > idx[None, :]
    Y = torch.where(strict, x[..., :, None], torch.ones((), dtype=x.dtype, device=x.device))
    return Y.cumprod(-2).masked_fill(~(strict | (idx[:, None] == idx[None, :])), 0.0)


def _titans_chunk_prep(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, a: Tensor, c: Tensor, d: Tensor):
    """Chunk-local parts of the chunked form (module doc), any leading dims, chunk length C.

    a (forgetting 1 - alpha), c (U -> M coupling, eta), d (momentum decay, eta): (..., C).
    Returns the solved pieces (Ucomp, W_N, W_U) with E = Ucomp - W_N N_0 - W_U U_0^T, the read
    matrix P, the start coefficients rho, sigma (..., C), and the end pieces.
    """
    one = torch.ones_like(a[..., :1])
    ext = lambda x, pad: torch.cat([pad, x], -1)        # a virtual token 0 stands for the chunk start
    Aseg = _segment_products(ext(a, one))                # (..., C+1, C+1)
    Eseg = _segment_products(ext(d, one))
    ce = ext(c, torch.zeros_like(one))
    Eshift = torch.cat([torch.zeros_like(Eseg[..., :1, :]), Eseg[..., :-1, :]], -2)   # Eseg[m - 1, i]
    X = Aseg @ (ce[..., :, None] * Eshift)               # U -> M cross term
    GM = Aseg + X                                        # g^M_{t, i}
    rho, sigma = Aseg[..., 1:, 0], X[..., 1:, 0]
    rho_prev, sigma_prev = Aseg[..., :-1, 0], X[..., :-1, 0]
    G = GM[..., 1:, 1:]                                  # lower incl. diagonal (t, i real tokens)
    G_prev = GM[..., :-1, 1:].tril(-1)                   # g^M_{t-1, i}, i < t
    A = (k @ k.transpose(-1, -2)) * G_prev * theta[..., None, :]
    C = k.shape[-2]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    dv = v.shape[-1]
    rhs = torch.cat([v, rho_prev[..., None] * k, sigma_prev[..., None] * k], -1)
    Xs = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    Ucomp, W_N, W_U = Xs[..., :dv], Xs[..., dv:dv + k.shape[-1]], Xs[..., dv + k.shape[-1]:]
    P = (q @ k.transpose(-1, -2)) * G * theta[..., None, :]
    k_N = k * (G[..., -1, :] * theta)[..., None]
    k_U = k * (Eseg[..., -1, 1:] * theta)[..., None]
    return Ucomp, W_N, W_U, P, rho, sigma, k_N, k_U, Eseg[..., -1, 0]


def titans_memory_chunked(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor | None = None,
                          alpha: Tensor | None = None, initial_state: TitansState | None = None,
                          chunk_size: int = 64, *, mask: Tensor | None = None) -> tuple[Tensor, TitansState]:
    """Chunked (parallel within a chunk) Titans linear memory, equal to :func:`titans_memory_recurrent`.

    Same arguments and returns; chunk_size C (T padded to a multiple of C with state-neutral tokens).
    See the module doc for the equations. Exact for the linear memory only.
    """
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype, dt = v.dtype, _compute_dtype(v.dtype)
    with _no_autocast(q):
        q, k, v, th = q.to(dt), k.to(dt), v.to(dt), theta.to(dt)
        a = torch.ones_like(th) if alpha is None else 1 - alpha.to(dt)
        e = torch.zeros_like(th) if eta is None else eta.to(dt)
        c_, d_ = e, e
        if mask is not None:
            m = mask.to(device=q.device).bool()[:, None, :].expand(B, H, T)
            th = th * m
            a = torch.where(m, a, torch.ones_like(a))
            c_ = torch.where(m, e, torch.zeros_like(e))
            d_ = torch.where(m, e, torch.ones_like(e))
        if initial_state is None:
            N, Ut = k.new_zeros(B, H, dk, dv), k.new_zeros(B, H, dk, dv)
        else:
            N, Ut = initial_state.memory.to(dt).transpose(-1, -2), initial_state.momentum.to(dt).transpose(-1, -2)
        C = min(int(chunk_size), max(T, 1))
        n = math.ceil(T / C)
        pad = n * C - T
        qc, kc, vc = (_chunks(_pad_time(x, pad), n, C) for x in (q, k, v))
        thc = _chunks(_pad_time(th, pad), n, C)
        ones_pad = lambda x: torch.cat([x, torch.ones_like(x[..., :1]).expand(*x.shape[:-1], pad)], -1) if pad else x
        ac, dc = _chunks(ones_pad(a), n, C), _chunks(ones_pad(d_), n, C)
        cc = _chunks(_pad_time(c_, pad), n, C)
        Ucomp, W_N, W_U, P, rho, sigma, k_N, k_U, tau = _titans_chunk_prep(qc, kc, vc, thc, ac, cc, dc)
        outs = []
        for i in range(n):                                               # loop over chunks only
            E = Ucomp[:, :, i] - W_N[:, :, i] @ N - W_U[:, :, i] @ Ut
            Q = qc[:, :, i]
            outs.append(rho[:, :, i, :, None] * (Q @ N) + sigma[:, :, i, :, None] * (Q @ Ut) + P[:, :, i] @ E)
            N, Ut = (rho[:, :, i, -1, None, None] * N + sigma[:, :, i, -1, None, None] * Ut
                     + k_N[:, :, i].transpose(-1, -2) @ E,
                     tau[:, :, i, None, None] * Ut + k_U[:, :, i].transpose(-1, -2) @ E)
        o = torch.cat(outs, dim=2)[:, :, :T] if outs else v.new_zeros(B, H, 0, dv)
        if mask is not None:
            o = o * mask.to(o.device, o.dtype)[:, None, :, None]
    return o.to(out_dtype), TitansState(N.transpose(-1, -2), Ut.transpose(-1, -2))
