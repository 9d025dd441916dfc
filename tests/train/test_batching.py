"""Epoch composition when datasets differ in size: ``data.weights`` draws each dataset's share of
an epoch exactly, with fresh subsets every epoch, and leaves unweighted runs unchanged."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from edge_glass.config import config_from_dict
from edge_glass.features.pipeline import PairedData
from edge_glass.data.samples import Sample
from edge_glass.errors import ConfigError
from edge_glass.tasks.alignment import dataset_rates
from edge_glass.train.loop import epoch_order


def mixed(n_big: int = 40, n_small: int = 6) -> PairedData:
    samples = [Sample(group=f"fsdd:x|{i}", source="", audio=str(i), text="one") for i in range(n_big)]
    samples += [Sample(group=f"jsonl:y|{i}", source="", audio=f"y{i}", text=f"t{i}") for i in range(n_small)]
    n = len(samples)
    return PairedData(samples, {"audio": torch.arange(n), "text": torch.arange(n)}, {})


def test_weights_set_each_datasets_share_of_every_epoch():
    data = mixed()
    rates = dataset_rates(data, {"fsdd:x": 0.25, "jsonl:y": 2})
    seen = []
    for epoch in range(3):
        order = epoch_order(data, epoch, 0, "all", rates)
        counts = Counter(data.samples[i].group.split("|")[0] for i in order.tolist())
        assert counts == {"fsdd:x": 10, "jsonl:y": 12}  # a quarter of 40; every small-set sample twice
        assert all(n == 2 for i, n in Counter(order.tolist()).items() if i >= 40)
        seen.append({i for i in order.tolist() if i < 40})
    assert seen[0] != seen[1] and len(seen[0] | seen[1] | seen[2]) > 10  # a fresh subset each epoch


def test_without_weights_the_epoch_is_the_plain_seeded_permutation():
    data = mixed()
    assert dataset_rates(data, {}) is None
    g = torch.Generator().manual_seed(3 * 100_003 + 2)
    assert torch.equal(epoch_order(data, 2, 3, "all"), torch.randperm(len(data), generator=g))


def test_weights_must_name_training_datasets():
    base = {"encoders": {"audio": {"type": "whisper"}, "text": {"type": "sentence_transformer"}}}
    with pytest.raises(ConfigError, match="weights: .fsdd:y. is not one of data.train"):
        config_from_dict({**base, "data": {"train": ["fsdd:x"], "weights": {"fsdd:y": 0.5}}})
