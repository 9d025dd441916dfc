"""Metrics to JSONL (one object per line, with step) and TensorBoard, main process only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, write_error


def parse_line(text: str) -> dict[str, Any] | None:
    """One metrics.jsonl line, or None for a blank or torn one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def flatten(prefix: str, obj: Any) -> dict[str, float]:
    if isinstance(obj, dict):
        out: dict[str, float] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}/{k}" if prefix else str(k), v))
        return out
    return {prefix: float(obj)} if isinstance(obj, (int, float)) else {}


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # a resumed run repeats the steps after its checkpoint: drop their old lines, a line
            # torn by the kill (it is not JSON) and the test line of a finished run (a resumed
            # run evaluates again and logs it again)
            kept = [line for line in (parse_line(l) for l in self.path.read_text(encoding="utf-8", errors="replace").splitlines())
                    if line is not None and line.get("step", 0) <= resume_step and line.get("kind") != "test"]
            atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step is not None else None)
        except ImportError:  # tensorboard is a dependency; tolerate its absence in minimal installs
            self.tb = None

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        except OSError as exc:
            raise write_error(self.path, exc) from None
        if self.tb is not None:
            for k, v in flatten(kind, values).items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
