"""Continuum Memory System: per-level cadence, accumulated gradients, plain-optimizer equivalence
at period 1, and bitwise resumption of counters, accumulators and inner optimizer state."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from edge_glass.nested.cms import CMSConfig, CMSOptimizer, ContinuumMemory, LevelSpec, control_groups
from numerics import FP32_SUM, assert_close_rel

torch.set_num_threads(1)


def _memory(periods: list[int], lrs: list[float], optimizer: str = "sgd", d: int = 4, hidden: int = 6, seed: int = 0,
            kwargs: dict | None = None) -> ContinuumMemory:
    torch.manual_seed(seed)
    cfg = CMSConfig(d, [LevelSpec(period=p, lr=lr, hidden=hidden, optimizer=optimizer, optimizer_kwargs=dict(kwargs or {}))
                        for p, lr in zip(periods, lrs)])
    return ContinuumMemory(cfg)


def _batches(n: int, d: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)) for _ in range(n)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


def test_forward_is_the_residual_pre_norm_chain():
    mem = _memory([1, 16, 256], [1e-3, 3e-4, 1e-4])
    x = torch.randn(3, 2, 4)
    expected = x
    for lv in mem.levels:
        u = nn.functional.layer_norm(expected, (4,), lv.norm.weight, lv.norm.bias)
        expected = expected + nn.functional.linear(nn.functional.gelu(nn.functional.linear(u, lv.fc1.weight, lv.fc1.bias)),
                                                   lv.fc2.weight, lv.fc2.bias)
    assert [lv.fc1.out_features for lv in mem.levels] == [6, 6, 6]
    assert_close_rel(mem(x), expected, FP32_SUM, "CMS forward")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_level_updates_on_its_cadence_by_the_accumulated_gradient(reduction):
    periods, lrs = [1, 3, 5], [0.1, 0.05, 0.02]
    mem = _memory(periods, lrs)
    opt = CMSOptimizer.for_memory(mem, reduction=reduction)
    assert opt.periods == periods
    window: list[list[list[torch.Tensor]]] = [[] for _ in periods]  # per level: the grads since its last update
    last = [[p.detach().clone() for p in lv.parameters()] for lv in mem.levels]
    for t, (x, y) in enumerate(_batches(16), start=1):
        opt.zero_grad()
        _loss(mem, x, y).backward()
        for i, lv in enumerate(mem.levels):
            window[i].append([p.grad.detach().clone() for p in lv.parameters()])
        stepped = opt.step()
        assert stepped == [i for i, c in enumerate(periods) if t % c == 0], f"step {t}"
        for i, lv in enumerate(mem.levels):
            params = [p.detach() for p in lv.parameters()]
            if i not in stepped:
                assert all(torch.equal(p, q) for p, q in zip(params, last[i])), f"level {i} moved off its cadence at step {t}"
                continue
            for k, (p, q) in enumerate(zip(params, last[i])):
                summed = torch.stack([w[k] for w in window[i]]).double().sum(0)
                g = summed if reduction == "sum" else summed / periods[i]
                expected = q.double() - lrs[i] * g
                assert_close_rel(p, expected, FP32_SUM, f"level {i} param {k} at step {t}")
            last[i] = [p.clone() for p in params]
            window[i] = []
    assert [lv.updates for lv in opt.levels] == [16, 5, 3]


def test_sum_and_mean_differ_by_the_period_for_sgd():
    """reduction='mean' with lr * C equals reduction='sum' with lr (same SGD update)."""
    a = _memory([4], [0.02])
    b = copy.deepcopy(a)
    opt_sum = CMSOptimizer([{"params": a.parameters(), "period": 4, "lr": 0.02, "optimizer": "sgd"}], reduction="sum")
    opt_mean = CMSOptimizer([{"params": b.parameters(), "period": 4, "lr": 0.08, "optimizer": "sgd"}], reduction="mean")
    for x, y in _batches(8):
        for m, o in ((a, opt_sum), (b, opt_mean)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close_rel(q, p, FP32_SUM, "mean*C vs sum")
    untouched = _memory([4], [0.02])  # same seed: the initial weights
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), untouched.parameters())), "no update happened"


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_period_one_levels_are_a_plain_optimizer(name, cls):
    lrs = [1e-2, 3e-3, 1e-3]
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    mem = _memory([1, 16, 256], lrs, optimizer=name, kwargs=kwargs)
    ref = copy.deepcopy(mem)
    head = nn.Linear(4, 4)
    ref_head = copy.deepcopy(head)
    groups = mem.param_groups() + [{"params": head.parameters(), "lr": 5e-3, "optimizer": name, "optimizer_kwargs": kwargs}]
    opt = CMSOptimizer(groups, control=True)  # CONTROL: same lrs, every period 1
    assert opt.periods == [1, 1, 1, 1]
    plain = cls([{"params": lv.parameters(), "lr": lr} for lv, lr in zip(ref.levels, lrs)]
                + [{"params": ref_head.parameters(), "lr": 5e-3}], **kwargs)
    for x, y in _batches(10):
        for m, h, o in ((mem, head, opt), (ref, ref_head, plain)):
            o.zero_grad()
            _loss(lambda z: h(m(z)), x, y).backward()
            o.step()
    for p, q in zip([*mem.parameters(), *head.parameters()], [*ref.parameters(), *ref_head.parameters()]):
        assert torch.equal(p, q)


def test_control_construction_keeps_lrs_and_sets_periods_to_one():
    cfg = CMSConfig(4, [LevelSpec(1, 1e-3), LevelSpec(16, 3e-4), LevelSpec(256, 1e-4)])
    ctrl = cfg.as_control()
    assert [lv.period for lv in ctrl.levels] == [1, 1, 1]
    assert [lv.lr for lv in ctrl.levels] == [1e-3, 3e-4, 1e-4]
    mem = ContinuumMemory(cfg)
    groups = control_groups(mem.param_groups())
    assert [g["period"] for g in groups] == [1, 1, 1] and [g["lr"] for g in groups] == [1e-3, 3e-4, 1e-4]
    assert [g["period"] for g in mem.param_groups(control=True)] == [1, 1, 1]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_save_load_mid_period_resumes_bitwise(reduction):
    torch.manual_seed(0)
    mem = ContinuumMemory(CMSConfig(4, [LevelSpec(1, 1e-2, 6, "adamw"), LevelSpec(3, 3e-3, 6, "adam"),
                                        LevelSpec(7, 1e-2, 6, "dmgd", {"momentum": 0.9})]))
    head = nn.Linear(4, 4)
    model = nn.Sequential(mem, head)
    init = copy.deepcopy(model.state_dict())

    def build(m: nn.Sequential) -> CMSOptimizer:
        return CMSOptimizer.for_memory(m[0], [{"params": m[1].parameters(), "lr": 1e-2, "period": 1}], reduction=reduction)

    def train(m: nn.Sequential, opt: CMSOptimizer, batches) -> None:
        for x, y in batches:
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()

    batches = _batches(20)
    opt = build(model)
    train(model, opt, batches)  # uninterrupted: 20 steps

    other = copy.deepcopy(model)
    other.load_state_dict(init)
    opt2 = build(other)
    train(other, opt2, batches[:11])  # 11 = mid-period for periods 3 and 7
    assert [lv.count for lv in opt2.levels] == [0, 2, 4, 0]
    buf = io.BytesIO()
    torch.save({"model": other.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(init)  # garbage in the weights: load must overwrite them
    opt3 = build(resumed)
    resumed.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    assert opt3.step_count == 11 and [lv.count for lv in opt3.levels] == [0, 2, 4, 0]
    train(resumed, opt3, batches[11:])
    assert opt3.step_count == opt.step_count == 20
    assert [lv.count for lv in opt3.levels] == [lv.count for lv in opt.levels]
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(opt3.levels, opt.levels):
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a.acc, b.acc))


def test_parameter_without_grad_accumulates_zero():
    mem = _memory([2], [0.1])
    opt = CMSOptimizer.for_memory(mem)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in mem.parameters()]
    opt.zero_grad()
    _loss(mem, x, y).backward()
    grads = [p.grad.clone() for p in mem.parameters()]
    assert opt.step() == []
    opt.zero_grad()  # second step of the window without any gradient
    assert opt.step() == [0]
    for p, q, g in zip(mem.parameters(), before, grads):
        assert_close_rel(p, q - 0.1 * g, FP32_SUM, "one gradient in the window")


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="period"):
        CMSConfig(4, [LevelSpec(period=0)])
    with pytest.raises(ValueError, match="lr"):
        CMSConfig(4, [LevelSpec(period=2, lr=-1.0)])
    mem = _memory([1, 2], [0.1, 0.1])
    with pytest.raises(ValueError, match="more than one level"):
        CMSOptimizer([{"params": mem.parameters(), "lr": 0.1}, {"params": mem.levels[0].parameters(), "lr": 0.1}])
    with pytest.raises(ValueError, match="unknown optimizer"):
        CMSOptimizer([{"params": mem.parameters(), "lr": 0.1, "optimizer": "lion"}])
    with pytest.raises(ValueError, match="reduction"):
        CMSOptimizer.for_memory(mem, reduction="max")
    opt = CMSOptimizer.for_memory(mem)
    other = CMSOptimizer.for_memory(_memory([1, 3], [0.1, 0.1]))
    with pytest.raises(ValueError, match="period"):
        other.load_state_dict(opt.state_dict())
