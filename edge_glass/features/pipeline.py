"""Samples -> per-modality features: the view of a dataset that training and evaluation use.

Each modality keeps one row per distinct input (by content), so an image with five captions is
encoded once; ``PairedData.rows[m][i]`` is sample i's row in modality m's feature table (-1 when
the sample has no such input). Features come from the on-disk cache (encoded once) or, with the
cache off, from the live encoder on every batch. Inputs that fail to decode are dropped with
their samples and recorded in the DataReport.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..encoders.base import Encoder, EncoderOutput, FrozenEncoder, TrainableEncoder
from ..errors import DataError, InputError
from ..tensors import to_device
from .cache import FeatureCache, LiveFeatures
from ..data.samples import DataReport, Sample


@dataclass
class Batch:
    """Features of the samples in a batch, per modality.

    present[m] (B,) bool: which samples have modality m; features[m] covers only those rows (an
    EncoderOutput, or a trainable encoder's collated inputs);
    keys[m] (B,) int content ids (-1 where absent) so duplicates are not used as negatives.
    """

    present: dict[str, torch.Tensor]
    features: dict[str, EncoderOutput]
    keys: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(to_device(self.present, device), to_device(self.features, device), to_device(self.keys, device))

    def joint(self, a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples having both a and b: (B,) bool, and (B,) content keys of the (a, b)
        combination (equal key = same a and same b; -1 where either is absent)."""
        none = torch.zeros_like(next(iter(self.present.values())))
        both = self.present.get(a, none) & self.present.get(b, none)
        if not both.any():
            return both, torch.full(both.shape, -1, dtype=torch.long, device=both.device)
        return both, torch.where(both, self.keys[a] * 2**31 + self.keys[b], -1)


class PreparedInputs:
    """A trainable encoder's prepared inputs: ``batch(rows)`` is the collated batch the encoder
    takes (not features: the model runs the encoder, under autograd)."""

    def __init__(self, encoder: TrainableEncoder, prepared: list[Any]):
        self.encoder, self.prepared = encoder, prepared

    def __len__(self) -> int:
        return len(self.prepared)

    def batch(self, rows: torch.Tensor) -> Any:
        return self.encoder.collate([self.prepared[int(r)] for r in rows])


class PairedData:
    def __init__(self, samples: list[Sample], rows: dict[str, torch.Tensor], tables: dict[str, Any]):
        self.samples, self.rows, self.tables = samples, rows, tables

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modalities(self) -> list[str]:
        return list(self.rows)

    def select(self, keep: list[int]) -> "PairedData":
        idx = torch.tensor(keep, dtype=torch.long)
        return PairedData([self.samples[i] for i in keep], {m: r[idx] for m, r in self.rows.items()}, self.tables)

    def batch(self, idx: torch.Tensor) -> Batch:
        present, feats, keys = {}, {}, {}
        for m, rows in self.rows.items():
            r = rows[idx]
            has = r >= 0
            if has.any():
                present[m] = has
                feats[m] = self.tables[m].batch(r[has])
                keys[m] = r
        return Batch(present, feats, keys)

    def group_ids(self) -> torch.Tensor:
        """(N,) int id of each sample's group."""
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(s.group, len(ids)) for s in self.samples], dtype=torch.long)


def build_paired_data(
    samples: list[Sample],
    encoders: dict[str, Encoder],
    report: DataReport,
    cache_dir: Path | None,
    cache_dtype: str = "float16",
    shard_size: int = 1024,
    progress: bool = True,
) -> PairedData:
    """Encode (or find in the cache) every distinct input of the frozen encoders, prepare those
    of trainable ones (the model encodes them per batch); drop samples whose inputs fail."""
    bad: dict[int, InputError] = {}
    keys_per_modality: dict[str, list[str | None]] = {}
    for m, enc in encoders.items():
        keys: list[str | None] = []
        for i, s in enumerate(samples):
            item = getattr(s, m)
            if item is None or i in bad:
                keys.append(None)
                continue
            try:
                keys.append(enc.content_key(item))
            except InputError as err:
                bad[i] = err
                keys.append(None)
        keys_per_modality[m] = keys

    tables: dict[str, Any] = {}
    order: dict[str, list[str]] = {}
    for m, enc in encoders.items():
        items = {k: getattr(s, m) for k, s in zip(keys_per_modality[m], samples) if k is not None}
        cached = cache_dir is not None and isinstance(enc, FrozenEncoder)
        prepared: dict[str, Any] = {}
        failures: dict[str, InputError] = {}
        if cached:
            cache = FeatureCache(cache_dir, enc, cache_dtype, shard_size)
            failures = cache.fill(items, enc.cfg.batch_size, progress=progress)
        else:
            for k, item in items.items():
                try:
                    prepared[k] = enc.prepare(item)
                except InputError as err:
                    failures[k] = err
        for i, k in enumerate(keys_per_modality[m]):
            if k is not None and k in failures:
                bad.setdefault(i, failures[k])
        good = [k for k in items if k not in failures]
        order[m] = good
        if not good:
            continue
        if cached:
            tables[m] = cache.load(good)
        elif isinstance(enc, TrainableEncoder):
            tables[m] = PreparedInputs(enc, [prepared[k] for k in good])
        else:
            tables[m] = LiveFeatures(enc, [items[k] for k in good])

    for i, err in sorted(bad.items()):
        report.skip(samples[i].source, err.reason, err.what)
    kept = [i for i in range(len(samples)) if i not in bad]
    if not kept:
        raise DataError(f"no usable samples: all {len(samples)} were skipped (first: {next(iter(bad.values()))})")
    rows: dict[str, torch.Tensor] = {}
    for m in encoders:
        if m not in tables:
            continue
        pos = {k: j for j, k in enumerate(order[m])}
        rows[m] = torch.tensor([pos[keys_per_modality[m][i]] if keys_per_modality[m][i] is not None else -1 for i in kept], dtype=torch.long)
    return PairedData([samples[i] for i in kept], rows, tables)
