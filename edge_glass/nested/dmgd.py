"""Deep Momentum Gradient Descent (DMGD): momentum as a learned memory of the gradient stream.

Nested Learning (Behrouz et al. 2025) reads momentum as an associative memory that compresses the
gradients it has seen, trained by its own inner objective (the deep-momentum family, their eq. 23):

    W_{t+1} = W_t - lr * m_t(g_t),      m_t = alpha * m_{t-1} - eta * grad_m l(m_{t-1}; g_t)

This module implements that idea per parameter tensor P with gradient g_t (after the outer L2
weight decay, as torch.optim.SGD: g_t = dL/dP + weight_decay * P_t).

Vector ("linear") memory b, one value per coordinate, decay beta = ``momentum``, inner step
eta = ``inner_lr``. The memory b_{t-1} is its prediction of the coming gradient, and one inner
gradient step on the inner loss l(b; g_t) is taken per outer step:

    inner_loss="dot":  l(b; g) = -<b, g>            b_t = beta b_{t-1} + eta g_t
    inner_loss="l2":   l(b; g) = 1/2 ||b - g||^2     b_t = beta b_{t-1} - eta (b_{t-1} - g_t)
                                                        = (beta - eta) b_{t-1} + eta g_t

(b_0 = 0). With "dot", eta = 1, the update P_{t+1} = P_t - lr b_t is exactly
torch.optim.SGD(momentum=beta, dampening=0, nesterov=False); "l2" with beta = 1 is an exponential
moving average of the gradients with rate eta.

MLP ("mlp") memory: a tiny MLP phi_theta: R^2 -> R, shared by all coordinates of one parameter
tensor, corrects the vector memory (residual parametrisation, so it starts as classical momentum):

    s_t   = rms(g_t) + eps                                   (scale, so phi sees unit-scale inputs)
    z_t   = [g_t / s_t, b_t / s_t]                           (per-coordinate features)
    phi(z) = w2 . tanh(W1 z + c1) + c2                        (W1: h x 2, w2: h, w2 = c2 = 0 at start)
    o_t   = b_t + s_t phi_theta_t(z_t)                        (update direction; P_{t+1} = P_t - lr o_t)

theta is trained only by its inner objective on the gradient stream: the memory's previous
normalised output  o_hat_{t-1}(theta) = b_{t-1} / s_{t-1} + phi_theta(z_{t-1})  is a prediction of
the next normalised gradient g_hat_t = g_t / s_t, and before o_t is formed theta takes one step

    "dot":  l(theta) = -mean(o_hat_{t-1}(theta) * g_hat_t)
    "l2":   l(theta) = 1/2 mean((o_hat_{t-1}(theta) - g_hat_t)^2)
    theta_t = theta_{t-1} - mlp_lr * (grad_theta l(theta_{t-1}) + mlp_weight_decay * theta_{t-1})

(no step on the first update, where there is no prediction yet). The weight decay keeps theta
bounded (for "dot", whose loss is linear in phi and unbounded below). The inner gradient is taken
in closed form (:func:`mlp_inner_grads`, checked against autograd in the tests) inside ``step``
under torch.no_grad(): theta lives in the optimizer state as plain tensors (requires_grad=False),
so no outer autograd graph passes through ``step`` and an outer ``loss.backward()`` never reaches it. theta is initialised from its own torch.Generator
(``seed``, group and parameter index), so building the optimizer does not consume the global RNG.

State per parameter: ``momentum_buffer`` (b), and for "mlp" ``mlp_w1``, ``mlp_c1``, ``mlp_w2``,
``mlp_c2`` and ``features`` (z_t, shape (2, *P.shape)), ``step``. Memory cost: 1 buffer (linear)
or 3 buffers (mlp) the size of the parameter.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

MEMORIES = ("linear", "mlp")
INNER_LOSSES = ("dot", "l2")
_MLP_KEYS = ("mlp_w1", "mlp_c1", "mlp_w2", "mlp_c2")


def _check_number(name: str, value: Any, *, low: float, strict: bool = False, high: float | None = None,
                  high_strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v != v or (strict and v <= low) or (not strict and v < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    if high is not None and ((high_strict and v >= high) or (not high_strict and v > high)):
        raise ValueError(f"{name} must be {'<' if high_strict else '<='} {high}, got {value!r}")
    return v


def mlp_phi(w1: Tensor, c1: Tensor, w2: Tensor, c2: Tensor, z: Tensor) -> Tensor:
    """phi(z) = w2 . tanh(W1 z + c1) + c2 per coordinate: z (2, N) -> (N,)."""
    hidden = torch.tanh(torch.addmm(c1[:, None], w1, z))  # (h, N)
    return (w2 @ hidden) + c2


def mlp_inner_loss(w1: Tensor, c1: Tensor, w2: Tensor, c2: Tensor, z: Tensor, g_hat: Tensor, inner_loss: str) -> Tensor:
    """The inner loss of the previous prediction o_hat = z[1] + phi(z) against the gradient g_hat (N,)."""
    pred = z[1] + mlp_phi(w1, c1, w2, c2, z)
    if inner_loss == "dot":
        return -(pred * g_hat).mean()
    return 0.5 * (pred - g_hat).pow(2).mean()


def mlp_inner_grads(w1: Tensor, c1: Tensor, w2: Tensor, c2: Tensor, z: Tensor, g_hat: Tensor,
                    inner_loss: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form gradient of :func:`mlp_inner_loss` w.r.t. (W1, c1, w2, c2), no autograd graph:

        a = W1 z + c1,  u = tanh(a),  r = dl/d o_hat = -g_hat / N ("dot") or (o_hat - g_hat) / N ("l2")
        dl/dw2 = u r,  dl/dc2 = sum r,  delta = (w2 r^T) * (1 - u^2),  dl/dW1 = delta z^T,  dl/dc1 = sum_N delta
    """
    n = z.shape[1]
    u = torch.tanh(torch.addmm(c1[:, None], w1, z))  # (h, N)
    if inner_loss == "dot":
        r = g_hat / (-n)
    else:
        r = (z[1] + (w2 @ u) + c2 - g_hat) / n
    delta = (w2[:, None] * r[None, :]) * (1.0 - u * u)  # (h, N)
    return delta @ z.T, delta.sum(1), u @ r, r.sum()


class DMGD(torch.optim.Optimizer):
    """Deep momentum gradient descent (see the module docstring for the equations).

    Args:
        params: parameters or parameter groups.
        lr: outer step size (>= 0).
        momentum: decay beta of the memory, in [0, 1) for "dot", [0, 1] for "l2".
        weight_decay: outer L2 weight decay added to the gradient (as SGD), >= 0.
        memory: "linear" (vector memory = classical momentum) or "mlp" (vector + learned MLP).
        inner_loss: "dot" (l = -<m, g>) or "l2" (l = 1/2 ||m - g||^2).
        inner_lr: inner step eta of the vector memory, > 0 (1.0 with "dot" = SGD momentum).
        hidden: hidden width h of the MLP memory (>= 1).
        mlp_lr: inner step size of the MLP memory's weights, >= 0.
        mlp_weight_decay: weight decay of the MLP memory's weights, >= 0.
        eps: added to rms(g) for the feature scale, > 0.
        seed: seed of the MLP memory's initialisation.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 0.0, memory: str = "mlp", inner_loss: str = "dot", inner_lr: float = 1.0,
                 hidden: int = 8, mlp_lr: float = 1e-3, mlp_weight_decay: float = 1e-2, eps: float = 1e-8,
                 seed: int = 0):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, memory=memory, inner_loss=inner_loss,
                        inner_lr=inner_lr, hidden=hidden, mlp_lr=mlp_lr, mlp_weight_decay=mlp_weight_decay, eps=eps,
                        seed=seed)
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(group: dict) -> None:
        if group["memory"] not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, got {group['memory']!r}")
        if group["inner_loss"] not in INNER_LOSSES:
            raise ValueError(f"inner_loss must be one of {INNER_LOSSES}, got {group['inner_loss']!r}")
        _check_number("lr", group["lr"], low=0.0)
        _check_number("weight_decay", group["weight_decay"], low=0.0)
        beta = _check_number("momentum", group["momentum"], low=0.0, high=1.0, high_strict=group["inner_loss"] == "dot")
        eta = _check_number("inner_lr", group["inner_lr"], low=0.0, strict=True)
        if group["inner_loss"] == "l2" and abs(beta - eta) >= 1.0:
            raise ValueError(f"inner_loss='l2' needs |momentum - inner_lr| < 1 for a bounded memory "
                             f"(b_t = (momentum - inner_lr) b_(t-1) + inner_lr g_t), got momentum={beta}, inner_lr={eta}")
        _check_number("mlp_lr", group["mlp_lr"], low=0.0)
        _check_number("mlp_weight_decay", group["mlp_weight_decay"], low=0.0)
        _check_number("eps", group["eps"], low=0.0, strict=True)
        h = group["hidden"]
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {h!r}")
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
            raise ValueError(f"seed must be an integer, got {group['seed']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _init_mlp(self, state: dict, p: Tensor, group: dict, gi: int, pi: int) -> None:
        gen = torch.Generator().manual_seed(int(group["seed"]) * 1_000_003 + gi * 10_007 + pi)
        h = group["hidden"]
        kw = dict(dtype=p.dtype, device=p.device)
        state["mlp_w1"] = (torch.randn(h, 2, generator=gen, dtype=torch.float64) / 2.0 ** 0.5).to(**kw)
        state["mlp_c1"] = torch.zeros(h, **kw)
        state["mlp_w2"] = torch.zeros(h, **kw)
        state["mlp_c2"] = torch.zeros((), **kw)

    @staticmethod
    def _inner_mlp_step(state: dict, g_hat: Tensor, group: dict) -> None:
        """theta <- theta - mlp_lr (grad l(theta) + mlp_weight_decay theta), l on the previous prediction."""
        z_prev = state["features"].reshape(2, -1)
        grads = mlp_inner_grads(*(state[k] for k in _MLP_KEYS), z_prev, g_hat.reshape(-1), group["inner_loss"])
        lr, wd = group["mlp_lr"], group["mlp_weight_decay"]
        for k, gr in zip(_MLP_KEYS, grads):
            w = state[k]
            w.add_(gr.add(w, alpha=wd), alpha=-lr)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            beta, eta, wd, lr = group["momentum"], group["inner_lr"], group["weight_decay"], group["lr"]
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("DMGD does not support sparse gradients")
                if wd != 0:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if group["memory"] == "mlp":
                        self._init_mlp(state, p, group, gi, pi)
                state["step"] += 1
                mlp = group["memory"] == "mlp"
                if mlp:
                    scale = g.pow(2).mean().sqrt().add_(group["eps"])
                    g_hat = g / scale
                    if "features" in state:
                        self._inner_mlp_step(state, g_hat, group)
                buf = state.get("momentum_buffer")
                if buf is None:  # b_1 = beta * 0 - eta * grad l(0; g_1) = eta g_1 for both losses
                    buf = torch.clone(g).detach() if eta == 1.0 else g.mul(eta)
                    state["momentum_buffer"] = buf
                elif group["inner_loss"] == "dot":
                    buf.mul_(beta).add_(g, alpha=eta)
                else:
                    buf.mul_(beta - eta).add_(g, alpha=eta)
                if not mlp:
                    p.add_(buf, alpha=-lr)
                    continue
                z = torch.stack([g_hat, buf / scale])
                state["features"] = z
                phi = mlp_phi(*(state[k] for k in _MLP_KEYS), z.reshape(2, -1)).reshape(p.shape)
                p.add_(buf.add(phi * scale), alpha=-lr)
        return loss

    def memory_weights(self, p: Tensor) -> dict[str, Tensor]:
        """The MLP memory's weights (theta) of parameter ``p`` (empty before its first step or for "linear")."""
        state = self.state.get(p, {})
        return {k: state[k] for k in _MLP_KEYS if k in state}
