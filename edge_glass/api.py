"""Using a trained run from Python (and the CLI's eval / embed / info verbs).

    model = edge_glass.load("runs/quickstart")
    img = model.encode_images(["a.jpg", pil_image], dim=128)    # (2, 128), unit rows
    txt = model.encode_texts(["a dog on a beach"])               # (1, 512) at the largest dim
    scores = img @ txt.T
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .data.formats import read_dataset
from .data.pipeline import PairedData, build_paired_data
from .data.samples import DataReport
from .encoders import build_encoders
from .encoders.base import FrozenEncoder
from .errors import EdgeGlassError
from .eval.retrieval import evaluate_retrieval
from .models.alignment import AlignmentModel
from .runs import RunDir
from .train.data import feature_cache_dir, limit_groups, load_eval_set


class AlignedModel(nn.Module):
    """Frozen encoders + trained heads: raw inputs -> embeddings in the shared space."""

    def __init__(self, cfg: Any, encoders: dict[str, FrozenEncoder], core: AlignmentModel, run_dir: Path | None = None):
        super().__init__()
        self.cfg, self.run_dir = cfg, run_dir
        self.encoders = nn.ModuleDict(encoders)
        self.core = core.eval()

    @property
    def dims(self) -> list[int]:
        return self.core.dims

    @torch.no_grad()
    def encode(self, modality: str, items: Iterable[Any], dim: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """(N, dim) L2-normalised embeddings; any dim up to the largest trained one (nested)."""
        if modality not in self.encoders:
            raise EdgeGlassError(f"this model has no {modality} encoder (it has {', '.join(self.encoders)})")
        dim = dim or self.dims[0]
        if not 1 <= dim <= self.dims[0]:
            raise EdgeGlassError(f"dim {dim} is outside 1..{self.dims[0]} (trained dims: {self.dims})")
        items = list(items)
        enc = self.encoders[modality]
        head = self.core.heads[modality]
        bs = batch_size or enc.cfg.batch_size
        out = [head.at_dim(enc.encode(items[s : s + bs]), dim) for s in range(0, len(items), bs)]
        if not out:
            return torch.empty(0, dim)
        return torch.cat(out)

    def encode_images(self, images: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Paths, bytes or PIL images -> (N, dim)."""
        return self.encode("image", images, dim)

    def encode_texts(self, texts: Iterable[str], dim: int | None = None) -> torch.Tensor:
        return self.encode("text", texts, dim)

    def encode_audio(self, clips: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Audio file paths or bytes -> (N, dim)."""
        return self.encode("audio", clips, dim)


def build_core(cfg: Any, encoders: dict[str, FrozenEncoder]) -> AlignmentModel:
    return AlignmentModel(cfg.model, cfg.loss, {m: e.token_dim for m, e in encoders.items()})


def load(run_dir: str | Path) -> AlignedModel:
    """Load a trained run directory (its config.yaml + model.safetensors; no YAML needed)."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    encoders = build_encoders(cfg.encoders)
    core = build_core(cfg, encoders)
    core.load_state_dict(run.load_weights())
    if run.file("encoders.json").exists():
        saved = run.read_json("encoders.json")
        for m, enc in encoders.items():
            if m in saved and saved[m].get("weights") != enc.weights_id():
                warnings.warn(f"{run.path}: the {m} backbone's weights differ from those the heads were trained on", stacklevel=2)
    return AlignedModel(cfg, encoders, core, run.path)


def heldout_data(model: AlignedModel, split: str, report: DataReport, progress: bool = True) -> PairedData:
    """Rebuild a run's own held-out split (from its config and split.json)."""
    run = RunDir(model.run_dir)  # type: ignore[arg-type]
    record = run.read_json("split.json")
    samples = []
    for spec in model.cfg.data.train:
        groups = set(record.get(spec, {}).get(split, []))
        samples += [s for s in limit_groups(read_dataset(spec, report), model.cfg.data.max_groups) if s.group in groups]
    if not samples:
        raise EdgeGlassError(f"{run.path}: its {split} split is empty")
    return build_paired_data(samples, dict(model.encoders), report, feature_cache_dir(model.cfg), model.cfg.cache.dtype, progress=progress)


def evaluate(run_dir: str | Path, data: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Retrieval metrics of a run on a dataset spec (default: the run's own test split)."""
    model = load(run_dir)
    report = DataReport()
    if data:
        paired = load_eval_set(data, dict(model.encoders), report, feature_cache_dir(model.cfg), model.cfg.cache.dtype, progress)
    else:
        paired = heldout_data(model, "test", report, progress)
    result = evaluate_retrieval(model.core, paired, model.cfg.eval.ks, model.cfg.eval.batch_size)
    result["skipped"] = len(report.skipped)
    if report.skipped:
        result["skipped_by_reason"] = dict(report.reasons())
    return result
