"""The NL scheduler: one torch optimizer over levels that update at different periods, and EMA weights.

:class:`NLOptimizer` wraps :class:`~edge_glass.nested.cms.CMSOptimizer` as a
``torch.optim.Optimizer``, so that the training loop, Accelerate (``prepare``, ``save_state``) and
the warmup + cosine LR schedule drive it like any optimizer:

    levels         "base" (every parameter outside the continuum memory: AdamW at train.lr, period 1,
                   decayed and non-decayed groups) and one level per CMS level of the central memory
                   (its own period in OPTIMIZER STEPS, learning rate and optimizer: DMGD or AdamW)
    step()         = step_all(t) for the next step t = 1, 2, ...: every level accumulates its gradient,
                   the levels whose period is reached update; ``last_stepped`` names them
    param_groups   the inner optimizers' own groups, so the LR schedule scales every level's lr
                   (each by the same warmup + cosine factor of its configured lr)
    state_dict()   step count, every level's counter, gradient accumulator and inner-optimizer state:
                   a run killed mid-period resumes bitwise equal

:class:`EMA`: exponential moving average of the trainable weights, kept as buffers of a module
(so checkpoints carry it and resume restores it exactly); decay_t = min(decay, (1 + t) / (10 + t)).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nested.cms import CMSOptimizer


class NLOptimizer(torch.optim.Optimizer):
    def __init__(self, groups: list[dict[str, Any]], reduction: str = "sum"):
        self.cms = CMSOptimizer(groups, reduction=reduction)
        params = [p for lv in self.cms.levels for p in lv.params]
        super().__init__(params, {})
        self.param_groups = [g for lv in self.cms.levels for g in lv.optimizer.param_groups]
        self.last_stepped: list[str] = []

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.cms.levels]

    @property
    def step_count(self) -> int:
        return self.cms.step_count

    def due(self, step: int) -> list[str]:
        """Names of the levels that update at step ``step`` (1-based), from their counters."""
        ahead = step - self.cms.step_count
        return [lv.name for lv in self.cms.levels if (lv.count + ahead) % lv.period == 0 and ahead > 0]

    def step_all(self, step: int) -> list[str]:
        """Run optimizer step ``step`` (must be the next one, 1-based); returns the levels that updated."""
        if step != self.cms.step_count + 1:
            raise ValueError(f"step_all({step}): the next step is {self.cms.step_count + 1}")
        self.last_stepped = [self.cms.levels[i].name for i in self.cms.step()]
        return self.last_stepped

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        self.step_all(self.cms.step_count + 1)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.cms.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.cms.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.cms.load_state_dict(state)
        self.param_groups = [g for lv in self.cms.levels for g in lv.optimizer.param_groups]


def nl_groups(base: list[dict[str, Any]], cms_levels: list[nn.Module], specs: list[Any] | None, lr: float,
              betas: tuple[float, float]) -> list[dict[str, Any]]:
    """CMSOptimizer groups: the base parameters (AdamW at ``lr``, period 1; ``base`` = the decayed and
    non-decayed groups {"params", "weight_decay"} of the whole core) and one group per CMS level."""
    in_levels = {id(p) for lv in cms_levels for p in lv.parameters()}
    groups = []
    for g, name in zip(base, ("base", "base_no_decay")):
        params = [p for p in g["params"] if id(p) not in in_levels]
        if params:
            groups.append({"params": params, "lr": lr, "period": 1, "optimizer": "adamw", "name": name,
                           "optimizer_kwargs": {"weight_decay": g["weight_decay"], "betas": tuple(betas)}})
    for level, spec in zip(cms_levels, specs or []):
        params = [p for p in level.parameters() if p.requires_grad]
        kwargs = dict(spec.optimizer_kwargs)
        if spec.optimizer in ("adamw", "adam"):
            kwargs.setdefault("betas", tuple(betas))
        groups.append({"params": params, "lr": spec.lr, "period": spec.period, "optimizer": spec.optimizer,
                       "optimizer_kwargs": kwargs, "name": spec.name})
    return groups


class EMA(nn.Module):
    """EMA copies of a module's trainable parameters (buffers named after them, '.' -> '__')."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        for n, p in module.named_parameters():
            if p.requires_grad:
                self.register_buffer(n.replace(".", "__"), p.detach().clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        t = int(self.updates) + 1
        d = min(self.decay, (1 + t) / (10 + t))
        params = dict(module.named_parameters())
        for n in self.names:
            getattr(self, n.replace(".", "__")).lerp_(params[n].detach(), 1.0 - d)
        self.updates.fill_(t)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n.replace(".", "__")) for n in self.names}
