"""Continuum Memory System (CMS): a chain of MLP levels updated at different frequencies.

Nested Learning (Behrouz et al. 2025) replaces the single feed-forward memory of a block by a chain
of MLP levels, level l with its own update period C_l and learning rate eta_l. Here each level is
a residual pre-norm MLP block (d_model -> hidden_l -> d_model):

    x_0 = x,    x_l = x_{l-1} + W2_l GELU(W1_l LN_l(x_{l-1}) + c1_l) + c2_l,    y = x_L

Update rule (:class:`CMSOptimizer`). The period unit is OPTIMIZER STEPS: one call of
``CMSOptimizer.step()`` is one step t = 1, 2, ... (one outer gradient). Every level l keeps an
accumulator A_l and a counter c_l of steps since its last update; on every step

    A_l <- A_l + grad_{theta_l} L_t,      c_l <- c_l + 1
    if c_l == C_l:    theta_l <- Opt_l(theta_l; G_l),   A_l <- 0,   c_l <- 0
        G_l = A_l            (reduction="sum", the default: the paper's sum of the gradients
                              of the window, theta <- theta - eta_l sum_{t in window} grad L_t for SGD)
        G_l = A_l / C_l      (reduction="mean")

so a level's parameters change only on steps where (steps since its last update) % C_l == 0, by
the gradients accumulated since then (a step on which a parameter had no gradient adds zero), and
Opt_l is the level's own inner optimizer (SGD, Adam, AdamW or DMGD) with its own lr eta_l; its
state (Adam moments, momentum) advances once per level update. Periods 1 / 16 / 256 with lower
learning rates for slower levels are the usual choice. A level of period 1 is stepped with the
current gradient directly (no accumulator), exactly as a plain optimizer; other parameters of a
model (an input projection, a classifier head) are given to the same CMSOptimizer as a group of
period 1. The CONTROL construction (:func:`control_groups`, ``CMSConfig.as_control``) keeps every
level's learning rate and optimizer but sets every period to 1 (no periodic updates).

``CMSOptimizer.state_dict()`` holds the step count, every level's counter and accumulators and
its inner optimizer's state, so that save -> load mid-period -> continue equals (bitwise) an
uninterrupted run.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OptimizerFactory = Callable[..., torch.optim.Optimizer]
REDUCTIONS = ("sum", "mean")


@dataclass
class LevelSpec:
    """One CMS level: update period (optimizer steps), lr, hidden width and inner optimizer."""

    period: int = 1
    lr: float = 1e-3
    hidden: int | None = None  # default: 4 * d_model
    optimizer: Union[str, OptimizerFactory] = "adamw"  # "sgd" | "adam" | "adamw" | "dmgd" | factory(params, lr=...)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass
class CMSConfig:
    d_model: int
    levels: list[LevelSpec] = field(default_factory=lambda: [LevelSpec(1, 1e-3), LevelSpec(16, 3e-4), LevelSpec(256, 1e-4)])

    def __post_init__(self) -> None:
        if isinstance(self.d_model, bool) or not isinstance(self.d_model, int) or self.d_model < 1:
            raise ValueError(f"d_model must be an integer >= 1, got {self.d_model!r}")
        self.levels = [lv if isinstance(lv, LevelSpec) else LevelSpec(**lv) for lv in self.levels]
        if not self.levels:
            raise ValueError("a CMS needs at least one level")
        for i, lv in enumerate(self.levels):
            _check_period(lv.period, f"level {i}")
            _check_lr(lv.lr, f"level {i}")
            if lv.hidden is not None and (isinstance(lv.hidden, bool) or not isinstance(lv.hidden, int) or lv.hidden < 1):
                raise ValueError(f"level {i}: hidden must be an integer >= 1, got {lv.hidden!r}")

    def as_control(self) -> CMSConfig:
        """The same levels (lr, hidden, optimizer) with every period 1: no periodic updates."""
        return CMSConfig(self.d_model, [replace(lv, period=1) for lv in self.levels])


def _check_period(period: Any, what: str) -> int:
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"{what}: period must be an integer >= 1 (optimizer steps), got {period!r}")
    return period


def _check_lr(lr: Any, what: str) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"{what}: lr must be a number >= 0, got {lr!r}")
    return float(lr)


class CMSLevel(nn.Module):
    """Residual pre-norm MLP block: x + W2 GELU(W1 LN(x) + c1) + c2."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ContinuumMemory(nn.Module):
    """A chain of :class:`CMSLevel` blocks, one per :class:`LevelSpec`; (..., d_model) -> (..., d_model)."""

    def __init__(self, config: CMSConfig):
        super().__init__()
        self.config = config
        self.levels = nn.ModuleList(CMSLevel(config.d_model, lv.hidden or 4 * config.d_model) for lv in config.levels)

    def forward(self, x: Tensor) -> Tensor:
        for level in self.levels:
            x = level(x)
        return x

    def param_groups(self, control: bool = False) -> list[dict[str, Any]]:
        """One CMSOptimizer group per level (period, lr, optimizer from its spec; period 1 if ``control``)."""
        groups = []
        for i, (spec, level) in enumerate(zip(self.config.levels, self.levels)):
            groups.append({"params": list(level.parameters()), "period": 1 if control else spec.period, "lr": spec.lr,
                           "optimizer": spec.optimizer, "optimizer_kwargs": dict(spec.optimizer_kwargs),
                           "name": spec.name or f"cms{i}"})
        return groups


def control_groups(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CONTROL of a CMS: the same groups (params, lr, optimizer) with every period set to 1."""
    return [{**g, "period": 1} for g in groups]


def make_optimizer(optimizer: Union[str, OptimizerFactory], params: list[Tensor], lr: float,
                   kwargs: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """An inner optimizer by name ("sgd", "adam", "adamw", "dmgd") or from a factory(params, lr=..., **kwargs)."""
    kwargs = dict(kwargs or {})
    if callable(optimizer):
        return optimizer(params, lr=lr, **kwargs)
    name = str(optimizer).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    if name == "dmgd":
        from .dmgd import DMGD

        return DMGD(params, lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer {optimizer!r} (expected sgd, adam, adamw, dmgd or a factory)")


class _Level:
    """Book-keeping of one level: params, period, inner optimizer, step counter, accumulators."""

    def __init__(self, name: str, params: list[Tensor], period: int, optimizer: torch.optim.Optimizer):
        self.name, self.params, self.period, self.optimizer = name, params, period, optimizer
        self.count = 0  # steps since the last update
        self.acc: list[Tensor | None] = [None] * len(params)
        self.updates = 0


class CMSOptimizer:
    """Multi-frequency optimizer over parameter groups ("levels"); see the module docstring.

    ``groups``: dicts with ``params`` (required), ``lr`` (required), ``period`` (default 1),
    ``optimizer`` (name or factory, default "adamw"), ``optimizer_kwargs`` and ``name``.
    ``control=True`` sets every period to 1 (the CONTROL of the same groups).
    """

    def __init__(self, groups: Iterable[dict[str, Any]], reduction: str = "sum", control: bool = False):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.levels: list[_Level] = []
        self._step = 0
        seen: set[int] = set()
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or "params" not in g or "lr" not in g:
                raise ValueError(f"group {i}: expected a dict with 'params' and 'lr', got {g!r}")
            params = list(g["params"])
            if not params:
                raise ValueError(f"group {i}: no parameters")
            for p in params:
                if not isinstance(p, Tensor):
                    raise ValueError(f"group {i}: params must be tensors, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError(f"group {i}: a parameter appears in more than one level")
                seen.add(id(p))
            period = 1 if control else _check_period(g.get("period", 1), f"group {i}")
            lr = _check_lr(g["lr"], f"group {i}")
            opt = make_optimizer(g.get("optimizer", "adamw"), params, lr, g.get("optimizer_kwargs"))
            self.levels.append(_Level(str(g.get("name") or f"level{i}"), params, period, opt))
        if not self.levels:
            raise ValueError("CMSOptimizer needs at least one group")

    @classmethod
    def for_memory(cls, memory: ContinuumMemory, extra_groups: Sequence[dict[str, Any]] = (), reduction: str = "sum",
                   control: bool = False) -> CMSOptimizer:
        """A CMSOptimizer over a ContinuumMemory's levels plus other groups (e.g. a head, period 1)."""
        return cls([*memory.param_groups(), *extra_groups], reduction=reduction, control=control)

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def periods(self) -> list[int]:
        return [lv.period for lv in self.levels]

    @torch.no_grad()
    def step(self) -> list[int]:
        """One optimizer step: accumulate every level's gradients, update the levels whose period is
        reached. Returns the indices of the levels that were updated."""
        self._step += 1
        stepped = []
        for i, lv in enumerate(self.levels):
            if lv.period == 1:
                lv.optimizer.step()
                lv.updates += 1
                stepped.append(i)
                continue
            for j, p in enumerate(lv.params):
                if p.grad is None:
                    continue
                if lv.acc[j] is None:
                    lv.acc[j] = p.grad.detach().clone()
                else:
                    lv.acc[j].add_(p.grad)
            lv.count += 1
            if lv.count < lv.period:
                continue
            current = [p.grad for p in lv.params]
            for p, a in zip(lv.params, lv.acc):
                p.grad = None if a is None else (a if self.reduction == "sum" else a.div_(lv.count))
            try:
                lv.optimizer.step()
            finally:
                for p, g in zip(lv.params, current):
                    p.grad = g
            lv.acc = [None] * len(lv.params)
            lv.count = 0
            lv.updates += 1
            stepped.append(i)
        return stepped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' .grad (the accumulators are kept: they belong to the schedule)."""
        for lv in self.levels:
            lv.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "reduction": self.reduction,
            "levels": [{"name": lv.name, "period": lv.period, "count": lv.count, "updates": lv.updates,
                        "acc": [None if a is None else a.clone() for a in lv.acc],
                        "optimizer": copy.deepcopy(lv.optimizer.state_dict())} for lv in self.levels],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        levels = state["levels"]
        if len(levels) != len(self.levels):
            raise ValueError(f"state has {len(levels)} levels, this CMSOptimizer has {len(self.levels)}")
        if state.get("reduction", self.reduction) != self.reduction:
            raise ValueError(f"state was saved with reduction={state['reduction']!r}, this one uses {self.reduction!r}")
        for i, (lv, s) in enumerate(zip(self.levels, levels)):
            if s["period"] != lv.period or len(s["acc"]) != len(lv.params):
                raise ValueError(f"level {i}: state has period {s['period']} and {len(s['acc'])} params, "
                                 f"this level has period {lv.period} and {len(lv.params)} params")
            for p, a in zip(lv.params, s["acc"]):
                if a is not None and a.shape != p.shape:
                    raise ValueError(f"level {i}: accumulator shape {tuple(a.shape)} does not match parameter {tuple(p.shape)}")
        self._step = int(state["step"])
        for lv, s in zip(self.levels, levels):
            lv.count, lv.updates = int(s["count"]), int(s.get("updates", 0))
            lv.acc = [None if a is None else a.detach().to(device=p.device, dtype=p.dtype).clone()
                      for p, a in zip(lv.params, s["acc"])]
            lv.optimizer.load_state_dict(s["optimizer"])
