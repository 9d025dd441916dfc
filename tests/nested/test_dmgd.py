"""Deep momentum gradient descent: the vector memory with the dot inner loss is SGD momentum, the
l2 inner loss is an EMA, the MLP memory learns from its own inner objective only (no outer graph),
state round trips bitwise, it trains a real model, and bad hyperparameters are rejected."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from edge_glass.nested.dmgd import DMGD, mlp_inner_grads, mlp_inner_loss, mlp_phi
from numerics import FP32_OPS, FP32_SUM, assert_close_rel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
           start: int = 0, batch: int = 32) -> list[float]:
    losses = []
    for t in range(start, start + steps):
        i = (t * batch) % len(x)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_linear_memory_with_dot_loss_is_sgd_momentum(digits, weight_decay):
    x, y = digits
    a, b = _model(), _model()
    ours = DMGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay, memory="linear", inner_loss="dot")
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=False)
    _train(a, ours, x, y, 20)
    _train(b, ref, x, y, 20)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close_rel(p, q, FP32_OPS, "DMGD(linear, dot) vs SGD(momentum)")
        assert_close_rel(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], FP32_OPS, "momentum buffer")


def test_linear_memory_with_l2_loss_is_an_ema():
    """l2: b_t = (beta - eta) b_(t-1) + eta g_t; with beta = 1 an EMA of the gradients."""
    p = nn.Parameter(torch.zeros(7))
    opt = DMGD([p], lr=0.5, momentum=1.0, memory="linear", inner_loss="l2", inner_lr=0.1)
    gen = torch.Generator().manual_seed(0)
    ema = torch.zeros(7, dtype=torch.float64)
    expected = torch.zeros(7, dtype=torch.float64)
    for _ in range(15):
        g = torch.randn(7, generator=gen)
        p.grad = g.clone()
        opt.step()
        ema = 0.9 * ema + 0.1 * g.double()
        expected = expected - 0.5 * ema
    assert_close_rel(opt.state[p]["momentum_buffer"], ema, FP32_SUM, "EMA buffer")
    assert_close_rel(p, expected, FP32_SUM, "parameter")


def test_mlp_memory_starts_as_classical_momentum(digits):
    """w2 = c2 = 0 at start: the first update of the MLP memory equals SGD momentum's."""
    x, y = digits
    a, b = _model(), _model()
    _train(a, DMGD(a.parameters(), lr=0.1, memory="mlp"), x, y, 1)
    _train(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), x, y, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("inner_loss", ["dot", "l2"])
def test_mlp_memory_learns_its_inner_objective(inner_loss):
    """On an alternating gradient stream (g_t = (-1)^t d + noise, which momentum / an EMA cannot
    predict) the MLP's weights move, and its normalised prediction of the next gradient scores a
    clearly lower inner loss than the vector memory alone (phi = 0)."""
    p = nn.Parameter(torch.zeros(64))
    kwargs = {"momentum": 1.0, "inner_lr": 0.1} if inner_loss == "l2" else {"momentum": 0.9}
    opt = DMGD([p], lr=0.0, memory="mlp", inner_loss=inner_loss, mlp_lr=0.05, mlp_weight_decay=1e-3, **kwargs)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen)
    w0 = None
    for t in range(200):
        p.grad = (-1) ** t * base + 0.3 * torch.randn(64, generator=gen)
        opt.step()
        if w0 is None:
            w0 = {k: v.clone() for k, v in opt.memory_weights(p).items()}
    w = opt.memory_weights(p)
    assert set(w) == {"mlp_w1", "mlp_c1", "mlp_w2", "mlp_c2"}
    assert not torch.equal(w["mlp_w2"], w0["mlp_w2"]) and not torch.equal(w["mlp_w1"], w0["mlp_w1"])
    z = opt.state[p]["features"].reshape(2, -1)  # features of the last step: predict the next gradient
    g_next = (-1) ** 200 * base + 0.3 * torch.randn(64, generator=gen)
    g_hat = g_next / g_next.pow(2).mean().sqrt()

    def inner(pred: torch.Tensor) -> float:
        return float(-(pred * g_hat).mean()) if inner_loss == "dot" else float(0.5 * (pred - g_hat).pow(2).mean())

    learned = inner(z[1] + mlp_phi(w["mlp_w1"], w["mlp_c1"], w["mlp_w2"], w["mlp_c2"], z))
    vector_only = inner(z[1])
    assert vector_only - learned > 0.5 * abs(vector_only), (learned, vector_only)


@pytest.mark.parametrize("inner_loss", ["dot", "l2"])
def test_closed_form_inner_gradient_matches_autograd(inner_loss):
    gen = torch.Generator().manual_seed(0)
    theta = [torch.randn(5, 2, generator=gen), torch.randn(5, generator=gen), torch.randn(5, generator=gen),
             torch.randn((), generator=gen)]
    z, g_hat = torch.randn(2, 40, generator=gen), torch.randn(40, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in theta]
    expected = torch.autograd.grad(mlp_inner_loss(*leaves, z, g_hat, inner_loss), leaves)
    for name, got, exp in zip(["W1", "c1", "w2", "c2"], mlp_inner_grads(*theta, z, g_hat, inner_loss), expected):
        assert_close_rel(got, exp, FP32_SUM, f"d l / d {name}")


def test_no_outer_graph_through_step(digits):
    x, y = digits
    model = _model()
    opt = DMGD(model.parameters(), lr=0.05, memory="mlp")
    _train(model, opt, x, y, 5)
    for p in model.parameters():
        assert p.is_leaf and p.grad_fn is None
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert not v.requires_grad and v.grad_fn is None, k
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()  # an outer loss after the steps
    for p in model.parameters():
        assert p.grad is not None
        for k, v in opt.memory_weights(p).items():
            assert v.grad is None, f"outer loss reached the memory's {k}"


@pytest.mark.parametrize("memory,inner_loss", [("mlp", "dot"), ("mlp", "l2"), ("linear", "dot")])
def test_state_dict_round_trip_resumes_bitwise(digits, memory, inner_loss):
    x, y = digits
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, memory=memory, inner_loss=inner_loss, hidden=4, seed=3)
    ref = _model()
    opt_ref = DMGD(ref.parameters(), **kw)
    _train(ref, opt_ref, x, y, 10)

    part = _model()
    opt_part = DMGD(part.parameters(), **kw)
    _train(part, opt_part, x, y, 5)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=1)
    opt_res = DMGD(resumed.parameters(), **{**kw, "seed": 99})  # its own seed is overwritten by the loaded state
    resumed.load_state_dict(saved["model"])
    opt_res.load_state_dict(saved["opt"])
    _train(resumed, opt_res, x, y, 5, start=5)
    for p, q in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for k, v in opt_ref.state[q].items():
            assert torch.equal(torch.as_tensor(opt_res.state[p][k]), torch.as_tensor(v)), k


@pytest.mark.parametrize("inner_loss", ["dot", "l2"])
def test_trains_a_classifier(digits, inner_loss):
    x, y = digits
    model = _model()
    kw = {"momentum": 1.0, "inner_lr": 0.1, "lr": 0.5} if inner_loss == "l2" else {"momentum": 0.9, "lr": 0.05}
    opt = DMGD(model.parameters(), memory="mlp", inner_loss=inner_loss, **kw)
    with torch.no_grad():
        start = nn.functional.cross_entropy(model(x), y).item()
    _train(model, opt, x, y, 60)
    with torch.no_grad():
        end = nn.functional.cross_entropy(model(x), y).item()
    assert np.isfinite(end) and end < 0.5 * start, (start, end)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"weight_decay": -1e-3}, "weight_decay"),
    ({"memory": "lstm"}, "memory"),
    ({"inner_loss": "cosine"}, "inner_loss"),
    ({"inner_lr": 0.0}, "inner_lr"),
    ({"inner_loss": "l2", "momentum": 0.9, "inner_lr": 2.0}, "bounded"),
    ({"hidden": 0}, "hidden"),
    ({"hidden": 2.5}, "hidden"),
    ({"mlp_lr": -0.1}, "mlp_lr"),
    ({"mlp_weight_decay": -0.1}, "mlp_weight_decay"),
    ({"eps": 0.0}, "eps"),
    ({"lr": "fast"}, "lr"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMGD([nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_param_group_raises():
    opt = DMGD([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="memory"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "memory": "gru"})
    assert copy.deepcopy(opt.state_dict())["param_groups"][0]["memory"] == "mlp"
