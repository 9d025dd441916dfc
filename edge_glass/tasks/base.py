"""The Task interface: everything a kind of experiment needs, from config to a loaded run.

One registry (``TASKS``) maps a config's ``task:`` to its Task; the training loop, ``api`` and
``cli`` only call these hooks, so a new model family is one file here plus its config class.

    training     load (data splits), build (the trainable core), loss, optimizer, after_step,
                 evaluate, score (best-step selection), state_to_save, checkpoint_state, save_files, records
    a trained    load_run (the inference model), evaluate_run (a data spec or the run's own
    run          test split), parameter_rows
    results      table (one result), compare (ablation variants)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError


class Task(ABC):
    """Subclass, set ``name``, implement the abstract hooks, and register with ``@register_task``.
    Datasets returned by ``load`` have __len__, group_ids() and batch(idx)."""

    name: ClassVar[str]

    @classmethod
    def find_unused_parameters(cls, cfg: Any) -> bool:
        """DDP: whether some parameters may get no gradient in a step."""
        return False

    def __init__(self, cfg: Any, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)  # where frozen encoders run while data are prepared
        self.records: dict[str, Any] = {}  # side files for the run directory: {file name: JSON object}

    # -- training ----------------------------------------------------------------------------
    @abstractmethod
    def load(self, report, progress: bool) -> dict[str, Any]:
        """{"train", "val", "test", "eval:<spec>"...: dataset}; also fills ``self.records``."""

    @abstractmethod
    def build(self) -> nn.Module:
        """The trainable core (a fresh, seeded init)."""

    @abstractmethod
    def loss(self, model: nn.Module, core: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one (per-process) batch and extra numbers to log; ``model`` may be DDP-wrapped;
        the batch is on the CPU, the core on its device."""

    def optimizer(self, core: nn.Module) -> torch.optim.Optimizer:
        """AdamW over decayed / non-decayed groups; a model family may bring its own optimizer."""
        t = self.cfg.train
        return torch.optim.AdamW(param_groups(core, t.weight_decay), lr=t.lr, betas=t.betas)

    def sampling(self, data: Any) -> tuple[str, torch.Tensor | None]:
        """How an epoch draws samples: ("all" | "one_per_group", per-sample rates or None)."""
        return "all", None

    def after_step(self, core: nn.Module) -> dict[str, Any]:
        """Called after every optimizer step; returns extra numbers to log."""
        return {}

    @abstractmethod
    def evaluate(self, core: nn.Module, data: Any, limit: int | None = None) -> dict[str, Any]:
        """Metrics of the core on a dataset from ``load`` (the core may be on any device)."""

    @abstractmethod
    def score(self, result: dict[str, Any]) -> float:
        """Higher is better: how validation results select the best step."""

    def state_to_save(self, core: nn.Module) -> dict[str, torch.Tensor]:
        """The weights a run directory keeps (default: all of the core's state)."""
        return core.state_dict()

    def checkpoint_state(self, core: nn.Module) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps to resume exactly (default: what the run keeps); a task
        whose saved model differs from its training state (EMA weights) keeps the whole state."""
        return self.state_to_save(core)

    def save_files(self, run) -> None:
        """Extra files a run directory needs to be loaded again (tokenizers...)."""

    # -- a trained run -----------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load_run(cls, run, device: torch.device | str = "cpu") -> nn.Module:
        """The inference model of a run directory (runs.RunDir), on ``device``."""

    @abstractmethod
    def evaluate_run(self, model: nn.Module, spec: str | None, report, progress: bool = True,
                     details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Metrics of a loaded run on a data spec, or on its own test split (spec None); a
        ``details`` dict receives what the report draws beyond the metrics (task-specific)."""

    @abstractmethod
    def parameter_rows(self, run_dir=None) -> list[tuple[str, int, int]]:
        """(module, total, trainable) counts, frozen backbones included."""

    # -- results -----------------------------------------------------------------------------
    @abstractmethod
    def table(self, result: dict[str, Any], title: str) -> str:
        """One result as plain text."""

    @abstractmethod
    def compare(self, results: dict[str, dict[str, Any]]) -> str:
        """Ablation variants' results ({variant: result}) as one plain-text table."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices; none on biases, norms, latents and learned queries."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith(("latents", "query")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(label: str, module: nn.Module | None) -> tuple[str, int, int]:
    """(label, total, trainable); tied weights count once."""
    params = {id(p): p for p in module.parameters()}.values() if module is not None else []
    return label, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"task: unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def task_for(cfg: Any, device: torch.device | str = "cpu") -> Task:
    return task_class(cfg.task)(cfg, device)


