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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fast_weights import _compute_dtype, _no_autocast

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
