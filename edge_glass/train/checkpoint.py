"""Atomic checkpoints through Accelerate's ``save_state`` / ``load_state``.

``checkpoints/step-N/`` holds what ``Accelerator.save_state`` writes (model, optimizer, the
registered LR scheduler, the RNG states of every process; under DeepSpeed ZeRO or FSDP the
sharded model and optimizer state of every rank) plus our ``state.json`` (step, data position,
running loss, best validation score). Without a sharding engine the model file is our own: the
weights the task keeps to resume (``Task.checkpoint_state``, by default ``state_to_save``: frozen backbones reloaded from their source are
left out), under the core's own parameter names, checked against the model when loaded.

Every process writes into ``checkpoints/.tmp-step-N``; once all have, rank 0 fsyncs it and renames
it to ``step-N``, and ``checkpoints/latest`` (a one-line file, replaced atomically) then points
at it. A run killed at any moment leaves the previous complete checkpoint or the new one, never a
torn one; a write that fails (full disk) on any process removes its temporary folder and stops
every process, and stale ones from killed runs are removed on start. Pickled files load with ``weights_only=True`` (Accelerate's loader):
a checkpoint cannot run code, and a refused or torn file is named. (DeepSpeed's and FSDP's own
sharded files are read by those libraries.) Checkpoints written before Accelerate's format
(``optimizer.pt``, ``scheduler.pt``, ``rng-R.pt``) still load without a sharding engine.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text, fsync_path, fsync_tree, tensors_for_saving, write_error
from ..errors import EdgeGlassError
from ..runs import read_safetensors

MODEL_FILE = "model.safetensors"  # Accelerate's name for the first model's weights (SAFE_WEIGHTS_NAME)


def sharded(acc) -> bool:
    """Whether the engine shards model / optimizer state over the processes (DeepSpeed, FSDP)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one; None without any."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").is_file():
            return cand
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _safe_load(path: Path) -> Any:
    """torch.load with weights_only=True (plus the numpy array types Accelerate's RNG files need);
    a refused (code-running) or torn file raises an EdgeGlassError that names it."""
    from accelerate.utils import load

    try:
        return load(str(path), map_location="cpu")
    except FileNotFoundError:
        raise EdgeGlassError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:  # noqa: BLE001  unpickling refused (not plain tensors/values) or a torn file
        raise EdgeGlassError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _as_os_error(exc: BaseException, where: Path) -> OSError | None:
    """The OSError behind a failed write: safetensors and torch.save report a full disk as opaque
    errors ("... (os error 28)", "unexpected pos ..."), so read the errno from the message, or
    from the disk itself when it has (next to) no room left."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
    try:
        if shutil.disk_usage(where).free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    return None


def agree(acc, error: Exception | None) -> None:
    """Raise on every process when one of them failed (a step only some processes take, a write
    that failed on one), instead of leaving the others waiting in the next collective."""
    if acc.num_processes > 1:
        failures = acc.reduce(torch.tensor([float(error is not None)], device=acc.device), reduction="sum")
        if error is None and failures.item() > 0:
            raise EdgeGlassError("another process failed (its error is above); stopping this one too")
    if error is not None:
        raise error


def together(acc, fn: Callable[[], None]) -> None:
    """Run ``fn`` on this process; if it fails on any process, raise on all of them."""
    error = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  re-raised by agree, here or on the other processes
        error = exc
    agree(acc, error)


def _fits(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; only frozen parameters and buffers may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # tied weights under every name
    if unexpected or set(missing) - frozen - {n for n, _ in model.named_buffers()}:
        raise EdgeGlassError(f"{path}: checkpoint does not fit the model (missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")


class Checkpointer:
    """Every process makes one (after ``acc.prepare``) and calls save / load together.

    core: the unwrapped trainable module; weights: what to keep of it (default its state_dict);
    scheduler: saved and restored with the rest (registered with Accelerate)."""

    def __init__(self, run_dir: Path, keep: int, acc, core: torch.nn.Module, scheduler=None,
                 weights: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.acc, self.core, self.scheduler = keep, acc, core, scheduler
        self.rank = acc.process_index
        self.weights = weights or (lambda m: m.state_dict())
        if scheduler is not None:
            acc.register_for_checkpointing(scheduler)
        if not sharded(acc):  # the model file is ours: the kept weights under the core's names
            acc.register_save_state_pre_hook(self._save_model)
            acc.register_load_state_pre_hook(self._load_model)
        if self.rank == 0:
            for stale in self.dir.glob(".tmp-step-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)

    # -- Accelerate hooks (engines without sharding) ---------------------------------------------
    def _save_model(self, models, weights, output_dir) -> None:
        weights[:] = [tensors_for_saving(self.weights(self.core))]

    def _load_model(self, models, input_dir) -> None:
        path = Path(input_dir) / MODEL_FILE
        _fits(path, self.core, read_safetensors(path))
        models.clear()  # loaded: Accelerate's strict load of the whole model is skipped

    # -- save --------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Every process calls this. ``state``: our own JSON state (step is added)."""
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"

        def fresh() -> None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write() -> None:
            self.acc.save_state(str(tmp))
            if self.rank == 0:
                _write(tmp / "state.json", json.dumps({**state, "step": step}).encode())

        try:
            together(self.acc, fresh)
            together(self.acc, write)
        except Exception as exc:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if (os_error := _as_os_error(exc, self.dir)) is not None:
                raise write_error(final, os_error) from None
            raise
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

        def publish() -> None:  # every process has written its part: rank 0 makes it the checkpoint
            if self.rank == 0:
                try:
                    fsync_tree(tmp)
                    shutil.rmtree(final, ignore_errors=True)
                    tmp.rename(final)
                    fsync_path(self.dir)
                    atomic_write_text(self.dir / "latest", final.name + "\n")
                except OSError as exc:
                    raise write_error(final, exc) from None
                for old in sorted(self.dir.glob("step-*"))[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)

        together(self.acc, publish)
        return final

    # -- load --------------------------------------------------------------------------------------
    def load(self, path: Path) -> dict[str, Any]:
        """Restore everything ``save`` wrote (on every process); returns our JSON state."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise EdgeGlassError(f"{path / 'state.json'}: cannot be read ({type(exc).__name__}: {exc})") from None
        if (path / "optimizer.pt").is_file():
            self._load_legacy(path)
            return state
        for f in sorted(path.iterdir()):  # check every pickle first: a refused or torn file is named
            if f.is_file() and f.suffix in (".bin", ".pkl", ".pt"):
                _safe_load(f)
        try:
            self.acc.load_state(str(path))
        except EdgeGlassError:
            raise
        except Exception as exc:  # noqa: BLE001  a sharded file DeepSpeed / FSDP could not read, a changed model...
            raise EdgeGlassError(f"{path}: cannot be restored ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
        return state

    def _load_legacy(self, path: Path) -> None:
        """A checkpoint of the format before Accelerate's (model.safetensors, optimizer.pt,
        scheduler.pt, rng-R.pt): loadable when nothing is sharded."""
        if sharded(self.acc):
            raise EdgeGlassError(f"{path}: written by an older edge-glass (optimizer.pt), which {self.acc.distributed_type.value} cannot "
                                 "resume; resume it without DeepSpeed / FSDP (one process, or DDP) once, or start the run afresh")
        _fits(path / MODEL_FILE, self.core, read_safetensors(path / MODEL_FILE))
        optimizer = self.acc._optimizers[0] if self.acc._optimizers else None
        if optimizer is not None:
            optimizer.load_state_dict(_safe_load(path / "optimizer.pt"))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(_safe_load(path / "scheduler.pt"))
        rng_file = path / f"rng-{self.rank}.pt"
        if rng_file.exists():
            _set_legacy_rng(_safe_load(rng_file))


def _set_legacy_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
