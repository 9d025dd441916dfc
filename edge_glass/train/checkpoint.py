"""Atomic checkpoints: model, optimizer, scheduler, RNG states of every process (CPU and CUDA),
data position.

A checkpoint is written into ``checkpoints/.tmp-step-N``, every file fsync'ed, and renamed to
``checkpoints/step-N`` once every process has written its part; ``checkpoints/latest`` (a
one-line file, replaced atomically) then points at it. A run killed at any moment leaves either
the previous complete checkpoint or the new one, never a torn one; a write that fails (full
disk) removes its temporary folder, and stale ones from killed runs are removed on start.
Everything loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text, fsync_path, write_error
from ..errors import EdgeGlassError
from ..runs import read_safetensors, safetensors_bytes


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and plain values (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: written to disk with plain file I/O, a full disk raises
    OSError(ENOSPC) (torch.save to a path raises an opaque RuntimeError instead)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise EdgeGlassError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:  # noqa: BLE001  unpickling refused (not plain tensors/values) or a torn file
        raise EdgeGlassError(f"{path}: cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, rank: int = 0, barrier=lambda: None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.barrier = keep, rank, barrier
        if rank == 0:
            for stale in self.dir.glob(".tmp-step-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler, state: dict[str, Any]) -> Path:
        """Every process calls this; rank 0 writes the shared parts and publishes. ``weights``:
        the model state to keep (frozen parts that are reloaded from their source may be left out)."""
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        own = tmp / f"rng-{self.rank}.pt"
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            _write(own, torch_bytes(rng_state()))
            if self.rank == 0:
                _write(tmp / "model.safetensors", safetensors_bytes(weights))
                _write(tmp / "optimizer.pt", torch_bytes(optimizer.state_dict()))
                _write(tmp / "scheduler.pt", torch_bytes(scheduler.state_dict()))
                _write(tmp / "state.json", json.dumps({**state, "step": step}).encode())
        except BaseException as exc:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                own.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise write_error(final, exc) from None
            raise
        self.barrier()
        if self.rank == 0:
            fsync_path(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fsync_path(self.dir)
            atomic_write_text(self.dir / "latest", final.name + "\n")
            for old in sorted(self.dir.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if pointer.is_file():
            cand = self.dir / pointer.read_text().strip()
            if (cand / "state.json").is_file():
                return cand
        done = sorted(p for p in self.dir.glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def load(self, path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
        missing, unexpected = model.load_state_dict(read_safetensors(path / "model.safetensors"), strict=False)
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # tied weights under every name
        if unexpected or set(missing) - frozen - {n for n, _ in model.named_buffers()}:
            raise EdgeGlassError(f"{path}: checkpoint does not fit the model (missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")
        optimizer.load_state_dict(_load(path / "optimizer.pt"))
        scheduler.load_state_dict(_load(path / "scheduler.pt"))
        rng_file = path / f"rng-{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(_load(rng_file))
        try:
            return json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise EdgeGlassError(f"{path / 'state.json'}: cannot be read ({type(exc).__name__}: {exc})") from None
