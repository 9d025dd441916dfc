"""A run directory is self-describing: resolved config, head weights (safetensors), split, reports.

    RUN/config.yaml          resolved experiment config (loadable without the original YAML)
    RUN/model.safetensors    trained heads + temperatures (frozen backbones come from their refs)
    RUN/encoders.json        fingerprints of the frozen backbones the heads were trained on
    RUN/split.json           held-out groups per dataset (val/test)
    RUN/data_report.json     samples read, kept, skipped (with reasons)
    RUN/metrics.jsonl        training/validation metrics; RUN/tensorboard/ the same for TensorBoard
    RUN/checkpoints/         atomic checkpoints for --resume
    RUN/eval.json            test-split retrieval metrics (and eval_<dataset>.json for extra sets)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from .config import config_from_dict, dump_config
from .errors import EdgeGlassError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # config
    def write_config(self, cfg: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.file("config.yaml").write_text(dump_config(cfg))

    def read_config(self) -> Any:
        f = self.file("config.yaml")
        if not f.is_file():
            raise EdgeGlassError(f"{self.path}: not a run directory (no config.yaml)")
        return config_from_dict(yaml.safe_load(f.read_text()), str(f))

    # json side files
    def write_json(self, name: str, obj: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.file(name).write_text(json.dumps(obj, indent=2))

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    # weights
    def save_weights(self, state: dict, name: str = "model.safetensors") -> None:
        tmp = self.file(name + ".tmp")
        save_file(tensors_for_saving(state), str(tmp))
        tmp.replace(self.file(name))

    def load_weights(self, name: str = "model.safetensors") -> dict:
        f = self.file(name)
        if not f.is_file():
            raise EdgeGlassError(f"{self.path}: no model.safetensors (training did not finish? resume it with --resume)")
        return load_file(str(f))


def tensors_for_saving(state: dict) -> dict:
    """Detached, contiguous CPU tensors; tied weights (one storage under two names, e.g. shared
    input/output embeddings) are stored as separate copies, which load back into the tie."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
