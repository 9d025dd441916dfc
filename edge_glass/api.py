"""Using a trained run from Python (and the CLI's eval / embed / info verbs). Thin: every verb
looks the run's task up in the one registry (edge_glass.tasks) and calls it.

    model = edge_glass.load("runs/quickstart")                    # device="cuda" to run there
    img = model.encode_images(["a.jpg", pil_image], dim=128)    # (2, 128), unit rows
    txt = model.encode_texts(["a dog on a beach"])               # (1, 512) at the largest dim
    scores = img @ txt.T
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.samples import DataReport
from .runs import RunDir
from .tasks import task_class, task_for


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto": CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(run_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a trained run directory (its config.yaml + model.safetensors; no YAML needed) on
    ``device`` (default: CUDA if available): an AlignedModel for alignment runs (``.encode_*``),
    a VisionLanguageModel for vlm runs (``.answer``), whatever its task's ``load_run`` returns."""
    run = RunDir(run_dir)
    return task_class(run.read_config().task).load_run(run, resolve_device(device))


def evaluate(run_dir: str | Path, data: str | None = None, progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Metrics of a run on a dataset spec (default: the run's own test split), as its task
    defines them; ``skipped`` counts unusable samples and ``skipped_samples`` names them."""
    model = load(run_dir, device)
    report = DataReport()
    result = task_for(model.cfg).evaluate_run(model, data, report, progress)
    result["skipped"] = len(report.skipped)
    if report.skipped:
        result["skipped_by_reason"] = dict(report.reasons())
        result["skipped_samples"] = [s.__dict__ for s in report.skipped]
    return result


def parameter_rows(cfg: Any, run_dir: Path | None = None) -> list[tuple[str, int, int]]:
    """(module, total, trainable) parameter counts of an experiment, frozen backbones included."""
    return task_for(cfg).parameter_rows(run_dir)
