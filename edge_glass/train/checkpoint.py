"""Atomic checkpoints: model, optimizer, scheduler, RNG states of every process, data position.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N``
once every process has written its part; ``checkpoints/latest`` (a one-line file, replaced
atomically) then points at it. A run killed at any moment leaves either the previous complete
checkpoint or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..runs import tensors_for_saving


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, rank: int = 0, barrier=lambda: None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.barrier = keep, rank, barrier

    def save(self, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler, state: dict[str, Any]) -> Path:
        """Every process calls this; rank 0 writes the shared parts and publishes. ``weights``:
        the model state to keep (frozen parts that are reloaded from their source may be left out)."""
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        torch.save(rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.rank == 0:
            save_file(tensors_for_saving(weights), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write_text(self.dir / "latest", final.name + "\n")
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
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if unexpected or set(missing) - frozen - {n for n, _ in model.named_buffers()}:
            raise RuntimeError(f"{path}: checkpoint does not fit the model (missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "state.json").read_text())
