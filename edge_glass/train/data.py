"""Datasets of an experiment config -> features per split (train / val / test + extra eval sets)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.formats import read_dataset
from ..data.pipeline import PairedData, build_paired_data
from ..data.samples import DataReport, Sample
from ..data.split import sample_splits
from ..encoders.base import FrozenEncoder
from ..paths import cache_root


def feature_cache_dir(cfg) -> Path | None:
    if not cfg.cache.enabled:
        return None
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir else cache_root() / "features"


def limit_groups(samples: list[Sample], max_groups: int | None) -> list[Sample]:
    """Keep the samples of the first ``max_groups`` groups (in file order)."""
    if max_groups is None:
        return samples
    keep: dict[str, None] = {}
    for s in samples:
        if s.group not in keep:
            if len(keep) == max_groups:
                continue
            keep[s.group] = None
    return [s for s in samples if s.group in keep]


def dataset_rates(data: PairedData, weights: dict[str, float]) -> torch.Tensor | None:
    """(N,) each sample's ``data.weights`` entry (1 if its dataset has none), found by the dataset
    spec that prefixes its group; None without weights (plain permutations)."""
    if not weights:
        return None
    return torch.tensor([weights.get(s.group.split("|", 1)[0], 1.0) for s in data.samples], dtype=torch.float64)


def evaluation_samples(samples: list[Sample]) -> list[Sample]:
    """What a dataset contributes to evaluation: its own test split when it predefines one
    (e.g. FSDD's test takes, the rest may have been trained on), else all of it."""
    test = [s for s in samples if s.split == "test"]
    return test or samples


def load_splits(cfg, encoders: dict[str, FrozenEncoder], report: DataReport, progress: bool = True) -> tuple[dict[str, PairedData], dict[str, dict[str, list[str]]]]:
    """All training datasets read, split by group per dataset, encoded once.

    Returns ({"train"|"val"|"test"|"eval:<spec>": PairedData}, {spec: {"val": groups, "test": groups}}).
    Groups are prefixed with their dataset spec, so two datasets never share a group. Splits a
    dataset predefines (Sample.split) are honoured; the seeded hash splits the rest.
    """
    samples: list[Sample] = []
    membership: dict[str, str] = {}  # group -> split
    split_record: dict[str, dict[str, list[str]]] = {}
    for spec in cfg.data.train:
        part = limit_groups(read_dataset(spec, report), cfg.data.max_groups)
        part = [Sample(**{**s.__dict__, "group": f"{spec}|{s.group}"}) for s in part]
        splits = sample_splits(part, cfg.data.split.val, cfg.data.split.test, cfg.data.split.seed)
        for name, groups in splits.items():
            membership.update((g, name) for g in groups)
        split_record[spec] = {k: sorted(g.split("|", 1)[1] for g in v) for k, v in splits.items() if k != "train"}
        samples += part
    extra: dict[str, list[Sample]] = {}
    for spec in cfg.data.eval:
        extra[spec] = [Sample(**{**s.__dict__, "group": f"{spec}|{s.group}"}) for s in evaluation_samples(read_dataset(spec, report))]
        samples += extra[spec]
    data = build_paired_data(samples, encoders, report, feature_cache_dir(cfg), cfg.cache.dtype, cfg.cache.shard_size, progress)
    out: dict[str, PairedData] = {}
    for name in ("train", "val", "test"):
        out[name] = data.select([i for i, s in enumerate(data.samples) if membership.get(s.group) == name])
    for spec in extra:
        out[f"eval:{spec}"] = data.select([i for i, s in enumerate(data.samples) if s.group.startswith(spec + "|")])
    for spec in cfg.data.train:
        report.kept[spec] += sum(1 for s in data.samples if s.group.startswith(spec + "|"))
    for spec in extra:
        report.kept[spec] += len(out[f"eval:{spec}"])
    return out, split_record


def load_eval_set(spec: str, encoders: dict[str, FrozenEncoder], report: DataReport, cache_dir: Path | None, cache_dtype: str = "float16", progress: bool = True) -> PairedData:
    samples = evaluation_samples(read_dataset(spec, report))
    data = build_paired_data(samples, encoders, report, cache_dir, cache_dtype, progress=progress)
    report.kept[spec] += len(data)
    return data
