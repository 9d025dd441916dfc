"""A vision-language decoder trained end to end through the CLI on real easy-VQA samples."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

EDGE_GLASS = [sys.executable, "-m", "edge_glass.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*EDGE_GLASS, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"edge-glass {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    pytest.importorskip("easy_vqa")
    root = tmp_path_factory.mktemp("vlm")
    cfg = {
        "task": "vlm", "name": "vlm_test",
        "projector": {"pool": "mean", "hidden": 64},
        "decoder": {"type": "tiny", "d_model": 64, "n_layers": 2, "n_heads": 4},
        "data": {"train": ["easy-vqa:train"], "max_samples": 1200, "val": 0.1, "test": 0.2},
        "train": {"epochs": 6, "batch_size": 32, "lr": 2.0e-3, "weight_decay": 0.01, "threads": 1, "checkpoint_every": 40, "select": "best"},
        "eval": {"max_new_tokens": 3, "samples": 4},
    }
    (root / "vlm.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "run"
    run("train", str(root / "vlm.yaml"), "--out", str(out), "--no-progress")
    return out


def test_run_dir_holds_what_reloading_needs(vlm_run):
    for name in ("config.yaml", "model.safetensors", "tokenizer.json", "qa.json", "eval.json", "eval_predictions.json", "split.json"):
        assert (vlm_run / name).is_file(), name


def test_generated_answers_beat_the_majority_answer_on_held_out_images(vlm_run):
    m = json.loads((vlm_run / "eval.json").read_text())
    assert {"exact_match", "f1", "n"} <= set(m) and m["n"] > 50
    assert m["exact_match"] > m["majority_exact_match"] + 10
    assert m["distinct_answers"] > 2  # not one answer for everything
    preds = json.loads((vlm_run / "eval_predictions.json").read_text())
    assert len(preds) == 4 and {"question", "answer", "prediction"} <= set(preds[0])


def test_eval_on_a_qa_jsonl_writes_em_f1_n(vlm_run, tmp_path):
    from edge_glass.data.vqa import read_easy_vqa

    samples, _ = read_easy_vqa("test")
    rows = [{"image": s.image, "question": s.question, "answer": s.answer} for s in samples[:30]]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run("eval", str(vlm_run), "--data", f"jsonl:{tmp_path / 'qa.jsonl'}", "--json", str(tmp_path / "m.json"), "--no-progress")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 30 and 0 <= m["exact_match"] <= 100 and 0 <= m["f1"] <= 100
    assert "exact match" in proc.stdout
    assert (tmp_path / "m.predictions.json").is_file()


def test_python_api_answers_questions_about_images(vlm_run):
    import edge_glass
    from edge_glass.data.vqa import read_easy_vqa

    model = edge_glass.load(vlm_run)
    samples, _ = read_easy_vqa("test")
    answers = model.answer([s.image for s in samples[:3]], [s.question for s in samples[:3]])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
