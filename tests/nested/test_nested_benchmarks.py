"""The nested-learning benchmarks: the MQAR task is what it claims to be, and the scripts run end to
end on tiny settings and write the JSON that BENCHMARKS.md is built from."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "nested"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_nested_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("forget", [0, 3])
def test_mqar_every_query_asks_a_stored_key_for_its_newest_value(forget):
    mqar = _load("mqar")
    vocab, pairs, length = 64, 6, 40
    tokens, targets = mqar.mqar_batch(np.random.default_rng(0), 8, length, pairs, vocab, forget=forget)
    kv_len = 2 * (pairs + forget)
    for row_t, row_y in zip(tokens.numpy(), targets.numpy()):
        newest = {}
        for i in range(0, kv_len, 2):
            assert 1 <= row_t[i] < vocab // 2 <= row_t[i + 1] < vocab
            newest[row_t[i]] = row_t[i + 1]
        assert len(newest) == pairs                                   # distinct keys
        queries = np.flatnonzero(row_y != -100)
        assert len(queries) == pairs and queries.min() >= kv_len       # every key asked once, after the pairs
        assert {row_t[q] for q in queries} == set(newest)
        for q in queries:
            assert row_y[q] == newest[row_t[q]]
        filler = np.setdiff1d(np.arange(kv_len, length), queries)
        assert (row_t[filler] == 0).all()
        if forget:  # a re-assigned key's answer is not its first value
            first = {row_t[i]: row_t[i + 1] for i in range(0, 2 * pairs, 2)}
            assert sum(first[k] != v for k, v in newest.items()) >= 1


def test_mqar_rejects_a_length_without_room_for_the_queries():
    mqar = _load("mqar")
    with pytest.raises(ValueError, match="need >= 192"):
        mqar.mqar_batch(np.random.default_rng(0), 1, 128, 64, 256)


def test_mqar_runs_every_model_and_writes_the_documented_json(tmp_path):
    mqar = _load("mqar")
    out = tmp_path / "mqar.json"
    mqar.main(["--pairs", "4", "--steps", "2", "--batch", "2", "--test-n", "4", "--train-length", "32",
               "--test-lengths", "32", "48", "--threads", "1", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert {r["model"] for r in results} == set(mqar.MODELS)
    assert {(r["model"], r["length"]) for r in results} == {(m, n) for m in mqar.MODELS for n in (32, 48)}
    for r in results:
        assert r["pairs"] == 4 and 0.0 <= r["accuracy"] <= 1.0
    params = {r["model"]: r["params"] for r in results}
    assert max(params.values()) <= 1.10 * min(params.values())     # equal parameter count (within 10%: HOPE reads per-head memories)


def test_speed_benchmark_times_both_forms_and_measures_memory(tmp_path):
    speed = _load("speed")
    out = tmp_path / "speed.json"
    speed.main(["--quick", "--lengths", "64", "--threads", "1", "--d-model", "32", "--json", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["kernels"]
    assert row["length"] == 64 and row["chunked_ms"] > 0 and row["recurrent_ms"] > 0 and row["train_speedup"] > 0
    layers = {(r["layer"], r["length"]) for r in result["memory"]}
    assert layers == {("gated_delta", 64), ("softmax", 64)}
    assert all(r["saved_for_backward_mib"] > 0 for r in result["memory"])


def test_continual_benchmark_reports_accuracy_and_backward_transfer(tmp_path):
    continual = _load("continual")
    out = tmp_path / "continual.json"
    continual.main(["--quick", "--streams", "digits", "--json", str(out)])
    streams = json.loads(out.read_text())["streams"]
    assert "digits" in streams
    for runs in streams["digits"]["runs"].values():
        for seed in runs.values():
            R = np.asarray(seed["R_task_il"])
            assert R.shape == (5, 5) and ((0 <= R) & (R <= 1)).all()
