"""Experiment kinds, as the one training loop sees them (edge_glass/train/loop.py).

A Task turns its config into data splits, a model, a loss per batch and an evaluation; the loop
does everything else (processes, optimizer, schedule, checkpoints, resume, logging, selection).

    alignment   frozen encoders -> heads -> contrastive Matryoshka loss; retrieval Recall@K
    vlm         frozen visual tokens -> projector -> decoder; generated answers, EM / F1
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Task(ABC):
    """Interface; datasets returned by ``load`` have __len__, group_ids() and batch(idx)."""

    find_unused_parameters = False  # DDP: some parameters may get no gradient in a step

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abstractmethod
    def load(self, report, progress: bool) -> dict[str, Any]:
        """{"train", "val", "test", "eval:<spec>"...: dataset}; also fills ``self.records``."""

    records: dict[str, Any] = {}  # side files for the run directory: {file name: JSON object}

    @abstractmethod
    def build(self) -> nn.Module:
        ...

    @abstractmethod
    def loss(self, model: nn.Module, core: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one (per-process) batch and extra numbers to log; ``model`` may be DDP-wrapped."""

    def sampling(self, data: Any) -> tuple[str, torch.Tensor | None]:
        """How an epoch draws samples: ("all" | "one_per_group", per-sample rates or None)."""
        return "all", None

    def after_step(self, core: nn.Module) -> dict[str, Any]:
        """Called after every optimizer step; returns extra numbers to log."""
        return {}

    @abstractmethod
    def evaluate(self, core: nn.Module, data: Any, limit: int | None = None) -> dict[str, Any]:
        ...

    @abstractmethod
    def score(self, result: dict[str, Any]) -> float:
        """Higher is better: how validation results select the best step."""

    @abstractmethod
    def table(self, result: dict[str, Any], title: str) -> str:
        ...

    def state_to_save(self, core: nn.Module) -> dict[str, torch.Tensor]:
        """The weights a run directory keeps (default: all of the core's state)."""
        return core.state_dict()

    def save_files(self, run) -> None:
        """Extra files a run directory needs to be loaded again (tokenizers...)."""


def task_for(cfg: Any) -> Task:
    from .alignment import AlignmentTask
    from .vqa import VQATask

    return {"alignment": AlignmentTask, "vlm": VQATask}[cfg.task](cfg)
