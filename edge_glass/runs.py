"""A run directory is self-describing: resolved config, head weights (safetensors), split, reports.

    RUN/config.yaml          resolved experiment config (loadable without the original YAML)
    RUN/model.safetensors    trained heads + temperatures (frozen backbones come from their refs)
    RUN/encoders.json        fingerprints of the frozen backbones the heads were trained on
    RUN/split.json           held-out groups per dataset (val/test)
    RUN/data_report.json     samples read, kept, skipped (with reasons)
    RUN/metrics.jsonl        training/validation metrics; RUN/tensorboard/ the same for TensorBoard
    RUN/checkpoints/         atomic checkpoints for --resume
    RUN/eval.json            test-split metrics (and eval_<dataset>.json for extra sets)

Every file is written atomically (edge_glass.atomic); a damaged file is reported with its path
and, where one exists, the checkpoint that still holds the weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, safetensors_bytes, tensors_for_saving  # noqa: F401  (re-exported)
from .config import config_from_dict, dump_config
from .errors import EdgeGlassError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in (self.path / "checkpoints").glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def _recovery_hint(self, name: str = "model.safetensors") -> str:
        """How to rebuild ``name`` when it is damaged: resuming a run (even a finished one) from its
        last checkpoint rewrites its weights and reports."""
        ckpt = self.latest_checkpoint()
        if name != "model.safetensors" or ckpt is None or not self.file("config.yaml").is_file():
            return ""
        return (f"; rebuild it from the last checkpoint {ckpt} with: "
                f"edge-glass train {self.file('config.yaml')} --out {self.path} --resume")

    # config
    def write_config(self, cfg: Any) -> None:
        atomic_write_text(self.file("config.yaml"), dump_config(cfg))

    def read_config(self) -> Any:
        f = self.file("config.yaml")
        if not f.is_file():
            raise EdgeGlassError(f"{self.path}: not a run directory (no config.yaml)")
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise EdgeGlassError(f"{f}: corrupt run config ({type(exc).__name__}); restore it from the config you trained with "
                                 "(edge-glass info CONFIG prints the resolved form)") from None
        if not isinstance(data, dict):
            raise EdgeGlassError(f"{f}: corrupt run config (not a mapping of keys); restore it from the config you trained with "
                                 "(edge-glass info CONFIG prints the resolved form)")
        return config_from_dict(data, str(f))

    # json side files
    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.file(name), obj)

    def read_json(self, name: str) -> Any:
        f = self.file(name)
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgeGlassError(f"{f}: missing from the run directory") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise EdgeGlassError(f"{f}: corrupt JSON ({exc})") from None

    # weights
    def save_weights(self, state: dict, name: str = "model.safetensors") -> None:
        atomic_write_bytes(self.file(name), safetensors_bytes(state))

    def load_weights(self, name: str = "model.safetensors") -> dict:
        f = self.file(name)
        if not f.is_file():
            raise EdgeGlassError(f"{f}: missing (training did not finish? resume it with --resume){self._recovery_hint(name)}")
        return read_safetensors(f, self._recovery_hint(name))

    def load_state_into(self, module, name: str = "model.safetensors") -> None:
        """Load the run's weights into ``module``, strictly; a mismatch names the file and keys."""
        state = self.load_weights(name)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EdgeGlassError(f"{self.file(name)}: weights do not fit the model of config.yaml "
                                 f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def read_safetensors(path: Path, hint: str = "") -> dict:
    """A safetensors file's tensors; a missing, empty, truncated or foreign file raises an error naming it."""
    try:
        if path.stat().st_size == 0:
            raise EdgeGlassError(f"{path}: empty file (the write was interrupted?){hint}")
        return load_file(str(path))
    except FileNotFoundError:
        raise EdgeGlassError(f"{path}: missing{hint}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise EdgeGlassError(f"{path}: not a readable safetensors file, truncated or corrupt ({reason}){hint}") from None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
