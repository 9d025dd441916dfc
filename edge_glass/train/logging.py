"""Metrics: metrics.jsonl (the project's own tracker, always on) and Accelerate's trackers
(``train.log_with``: tensorboard, wandb, mlflow...), main process only.

    RUN/metrics.jsonl                 one JSON object per line: {"step", "kind", ...values}
    RUN/tensorboard/<project>/        TensorBoard event files
    RUN/wandb/                        the W&B run (WANDB_MODE=offline works without a network)
    RUN/mlruns/                       MLflow's local file store, unless MLFLOW_TRACKING_URI names a server

Trackers get the values flattened to "kind/key/subkey" scalars (R@1 as R_at_1); a resumed run drops the lines
(and TensorBoard events) after its checkpoint and logs those steps again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, write_error
from ..errors import EdgeGlassError

# keys of a train line that measure the machine, not the run (they differ between two identical runs)
TIMING_KEYS = ("sec_per_step", "samples_per_sec", "memory")

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def parse_line(text: str) -> dict[str, Any] | None:
    """One metrics.jsonl line, or None for a blank or torn one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def flatten(prefix: str, obj: Any, sep: str = "/") -> dict[str, Any]:
    """Nested dicts as {"a/b/c": leaf}."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}{sep}{k}" if prefix else str(k), v, sep))
        return out
    return {prefix: obj}


def scalars(flat: dict[str, Any]) -> dict[str, float]:
    """The numbers of a flattened dict (strings, lists, None and booleans left out)."""
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def tracker_name(key: str) -> str:
    """A scalar's name as every tracker accepts it (MLflow allows letters, digits and _-. :/): R@1 -> R_at_1."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def unflatten(flat: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def check_trackers(names: list[str]) -> None:
    """Every tracker's package importable: Accelerate itself would skip a missing one silently."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise EdgeGlassError(f"train.log_with: {', '.join(missing)} not installed (pip install {' '.join(PACKAGES[n] for n in missing)}, "
                             "or pip install 'edge-glass[trackers]' for wandb and mlflow)")


def tracker_kwargs(names: list[str], run_dir: Path, run_name: str, resume_step: int | None) -> dict[str, dict[str, Any]]:
    """Accelerate's init_kwargs per tracker: everything lands in the run directory, and a resumed
    run continues the same tracker run (W&B id from the run directory, TensorBoard purges the
    steps after the checkpoint)."""
    run_dir = Path(run_dir).resolve()
    run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
    out: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and resume_step is not None:
        out["tensorboard"] = {"purge_step": resume_step + 1}
    if "wandb" in names:
        out["wandb"] = {"dir": str(run_dir), "name": run_name, "id": run_id, "resume": "allow"}
    if "mlflow" in names:
        out["mlflow"] = {"run_name": run_name, "logging_dir": str(run_dir / "mlruns" / "artifacts")}
    return out


class MetricsLogger:
    """``acc``: an Accelerator made with ``log_with`` and ``project_dir`` (make_accelerator);
    ``config``: the resolved experiment config, stored by the trackers that keep hyperparameters."""

    def __init__(self, run_dir: Path, acc, project: str, config: dict[str, Any] | None = None, resume_step: int | None = None):
        self.enabled = acc.is_main_process
        self.acc = acc
        self.path = Path(run_dir) / "metrics.jsonl"
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            # a resumed run repeats the steps after its checkpoint: drop their old lines, a line
            # torn by the kill (it is not JSON) and the test line of a finished run (a resumed
            # run evaluates again and logs it again)
            kept = [line for line in (parse_line(l) for l in self.path.read_text(encoding="utf-8", errors="replace").splitlines())
                    if line is not None and line.get("step", 0) <= resume_step and line.get("kind") != "test"]
            atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        names = [str(t) for t in acc.log_with]
        if not names:
            return
        if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # a local file store in the run (MLflow 3 keeps it behind MLFLOW_ALLOW_FILE_STORE; its
            # sqlite store needs full mlflow, not mlflow-skinny): MLFLOW_TRACKING_URI picks another
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(run_dir).resolve() / "mlruns").as_uri())
        try:
            acc.init_trackers(project, init_kwargs=tracker_kwargs(names, run_dir, Path(run_dir).name, resume_step))
        except Exception as exc:  # noqa: BLE001  no W&B account, an unreachable MLflow server...
            hint = "; without a W&B account or network set WANDB_MODE=offline" if "wandb" in names else ""
            raise EdgeGlassError(f"train.log_with: cannot start the trackers {names} ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''}){hint}") from None
        if config:
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flatten("", config, ".").items()}
            for tracker in acc.trackers:
                if tracker.name != "tensorboard":  # TensorBoard would write an extra event folder per run
                    tracker.store_init_configuration(hparams)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        except OSError as exc:
            raise write_error(self.path, exc) from None
        if self.acc.trackers:
            self.acc.log({tracker_name(k): v for k, v in scalars(flatten(kind, values)).items()}, step=step)

    def close(self) -> None:
        """Finish every tracker (Accelerator.end_training would also tear down the process group,
        which the next variant of an ablation, in the same processes, still needs)."""
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers.clear()

