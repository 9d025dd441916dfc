"""Deterministic train/val/test split by group (image or clip): no group lands in two splits."""
from __future__ import annotations

import hashlib

from .samples import Sample


def _count(spec: float, n: int) -> int:
    return int(spec) if spec >= 1 else round(spec * n)


def split_groups(groups: list[str], val: float, test: float, seed: int) -> dict[str, set[str]]:
    """Order groups by a seeded hash (stable under reordering or adding other groups), then take
    ``test`` groups for test, ``val`` for val, the rest for train (counts, or fractions if < 1)."""
    uniq = sorted(set(groups), key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    n_test, n_val = _count(test, len(uniq)), _count(val, len(uniq))
    if n_test + n_val >= len(uniq):
        raise ValueError(f"split: {n_test} test + {n_val} val groups leave nothing to train on ({len(uniq)} groups)")
    return {"test": set(uniq[:n_test]), "val": set(uniq[n_test : n_test + n_val]), "train": set(uniq[n_test + n_val :])}


def split_samples(samples: list[Sample], val: float, test: float, seed: int) -> dict[str, list[Sample]]:
    parts = split_groups([s.group for s in samples], val, test, seed)
    return {name: [s for s in samples if s.group in members] for name, members in parts.items()}
