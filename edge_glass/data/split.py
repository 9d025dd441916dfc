"""Deterministic train/val/test split by group (image or clip): no group lands in two splits.

A dataset may predefine splits (``Sample.split``, e.g. FSDD's official test takes): those groups
go where the dataset says, and the seeded hash divides the other groups among the splits the
dataset does not predefine (a dataset with its own test split gets no hashed test groups).
"""
from __future__ import annotations

import hashlib

from ..errors import DataError
from .samples import Sample

SPLITS = ("train", "val", "test")


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


def predefined_splits(samples: list[Sample]) -> dict[str, str]:
    """{group: split} for the groups whose samples name a split; raises DataError on a conflict."""
    out: dict[str, str] = {}
    for s in samples:
        if s.split is None:
            continue
        if s.split not in SPLITS:
            raise DataError(f"{s.source}: split {s.split!r} is not one of {', '.join(SPLITS)}")
        if out.setdefault(s.group, s.split) != s.split:
            raise DataError(f"{s.source}: group {s.group!r} is in both {out[s.group]!r} and {s.split!r}")
    return out


def sample_splits(samples: list[Sample], val: float, test: float, seed: int) -> dict[str, set[str]]:
    """Groups per split of one dataset: predefined ones as given, the rest hashed (split_groups)
    into the splits the dataset leaves undefined."""
    fixed = predefined_splits(samples)
    given = set(fixed.values())
    rest = [s.group for s in samples if s.group not in fixed]
    parts = {name: set() for name in SPLITS}
    if rest:
        parts = split_groups(rest, 0 if "val" in given else val, 0 if "test" in given else test, seed)
    for group, name in fixed.items():
        parts[name].add(group)
    return parts


def split_samples(samples: list[Sample], val: float, test: float, seed: int) -> dict[str, list[Sample]]:
    parts = sample_splits(samples, val, test, seed)
    return {name: [s for s in samples if s.group in members] for name, members in parts.items()}
