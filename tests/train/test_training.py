"""End-to-end training through the real CLI on real coco1k images and captions."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from numerics import FP32_NET, assert_close_rel
from safetensors.torch import load_file

from edge_glass.train.logging import TIMING_KEYS

EDGE_GLASS = [sys.executable, "-m", "edge_glass.cli"]


from helpers import relative_weight_gap, torchrun_train, train_losses, write_config


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*EDGE_GLASS, *args], check=False, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"edge-glass {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(coco_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = write_config(root / "tiny.yaml", coco_subset)
    out = root / "run"
    proc = run("train", str(cfg), "--out", str(out), "--no-progress")
    return cfg, out, proc.stdout


def test_train_writes_a_self_describing_run_dir(trained):
    _, out, stdout = trained
    for name in ("config.yaml", "model.safetensors", "encoders.json", "split.json", "data_report.json", "metrics.jsonl", "eval.json", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    assert "text_to_image" in stdout
    split = json.loads((out / "split.json").read_text())
    (held,) = split.values()
    assert len(held["test"]) == 8 and len(held["val"]) == 4 and not set(held["test"]) & set(held["val"])
    kinds = [json.loads(l)["kind"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val", "test"} <= set(kinds)


def test_eval_prints_a_table_and_writes_the_documented_json(trained, tmp_path):
    _, out, _ = trained
    proc = run("eval", str(out), "--json", str(tmp_path / "m.json"), "--no-progress")
    assert "text_to_image" in proc.stdout and "R@10" in proc.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    for block in ("text_to_image", "image_to_text"):
        assert set(m[block]) == {"R@1", "R@5", "R@10"} and all(0 <= v <= 100 for v in m[block].values())
    assert set(m["dims"]) == {"64", "32"} and set(m["dims"]["32"]) == {"text_to_image", "image_to_text"}
    assert m["n_images"] == 8 and m["n_texts"] >= 40
    assert m == {**json.loads((out / "eval.json").read_text()), "skipped": 0}  # same numbers as at the end of training


def test_eval_on_a_flickr8k_directory(trained, tmp_path, data_root):
    _, out, _ = trained
    (tmp_path / "images").mkdir()
    files = sorted((data_root / "coco1k" / "images").iterdir())[200:206]
    lines = ["image,caption"]
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / "images" / f"{i}.jpg")
        lines += [f"{i}.jpg,A photo number {i} , with a comma .", f'{i}.jpg,"A quoted caption, number {i}"']
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines.append("broken.jpg,a broken image")
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    proc = run("eval", str(out), "--data", f"flickr8k:{tmp_path}", "--json", str(tmp_path / "f.json"), "--no-progress")
    m = json.loads((tmp_path / "f.json").read_text())
    assert m["n_images"] == 6 and m["n_texts"] == 12 and m["skipped"] == 1
    assert "skipped 1" in proc.stdout


def test_python_api_loads_a_run_without_the_yaml(trained, data_root):
    import edge_glass

    cfg, out, _ = trained
    cfg.rename(cfg.with_suffix(".moved"))  # the run dir must not need it
    try:
        model = edge_glass.load(out)
        files = [str(f) for f in sorted((data_root / "coco1k" / "images").iterdir())[:2]]
        img = model.encode_images(files)
        txt = model.encode_texts(["a dog", "a plate of food"], dim=32)
        assert img.shape == (2, 64) and txt.shape == (2, 32)
        torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
        from PIL import Image

        # a batch of 1 vs 2 through EfficientNet-Lite and the head: float32 rounding of a deep network,
        # relative to the unit vector's scale
        assert_close_rel(model.encode_images([Image.open(files[0])], dim=32)[0], torch.nn.functional.normalize(img[0, :32], dim=0),
                         FP32_NET, "PIL image alone vs path in a batch")
    finally:
        cfg.with_suffix(".moved").rename(cfg)


def test_embed_writes_embeddings_and_ids(trained, tmp_path, data_root):
    _, out, _ = trained
    (tmp_path / "imgs").mkdir()
    for f in sorted((data_root / "coco1k" / "images").iterdir())[:3]:
        shutil.copy(f, tmp_path / "imgs" / f.name)
    run("embed", str(out), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "e.npz"), "--dim", "32")
    z = np.load(tmp_path / "e.npz")
    assert z["embeddings"].shape == (3, 32) and len(z["ids"]) == 3
    (tmp_path / "t.txt").write_text("a dog\n\nthe sea\n")
    run("embed", str(out), "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "t.npz"))
    assert np.load(tmp_path / "t.npz")["embeddings"].shape == (2, 64)


def test_info_counts_frozen_and_trainable_parameters(trained):
    _, out, _ = trained
    text = run("info", str(out)).stdout
    assert "encoders.image (efficientnet_lite, frozen)" in text and "heads.image.pooler" in text
    frozen = next(l for l in text.splitlines() if l.startswith("encoders.text"))
    assert frozen.split()[-1] == "0"  # nothing trainable in a frozen backbone


def test_bad_config_exits_with_the_key_path(tmp_path, coco_subset):
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    proc = run("train", str(cfg), "--set", "train.epochz=3", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "train.epochz: unknown key" in proc.stderr and str(cfg) in proc.stderr


def test_refuses_to_overwrite_a_run_without_resume(trained):
    cfg, out, _ = trained
    proc = run("train", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def _latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _kill_after(args: list[str], run_dir: Path, min_step: int, delay: float) -> None:
    proc = subprocess.Popen([*EDGE_GLASS, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _latest_step(run_dir) < min_step and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "eval.json").exists(), "the run finished before it could be killed"


def with_dropout(cfg_path: Path) -> Path:
    """Dropout and token dropout on the image head: every step draws from the torch RNG, so a
    resumed run matches only if the checkpoint restored the RNG state too."""
    cfg = yaml.safe_load(cfg_path.read_text())
    head = cfg["model"]["heads"]["image"]
    head["pooler"]["token_dropout"] = 0.25
    head["projection"] = {"dropout": 0.3}
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def test_run_killed_with_sigkill_and_resumed_ends_like_an_uninterrupted_run(coco_subset, tmp_path):
    cfg = with_dropout(write_config(tmp_path / "c.yaml", coco_subset, epochs=12, checkpoint_every=7))
    run("train", str(cfg), "--out", str(tmp_path / "straight"), "--no-progress")
    killed = tmp_path / "killed"
    rng = random.Random(0)
    args = ["train", str(cfg), "--out", str(killed), "--no-progress"]
    _kill_after(args, killed, min_step=7, delay=rng.uniform(0, 0.3))
    first = _latest_step(killed)
    _kill_after([*args, "--resume"], killed, min_step=first + 7, delay=rng.uniform(0, 0.3))
    assert _latest_step(killed) > first
    run(*args, "--resume")
    assert json.loads((killed / "eval.json").read_text()) == json.loads((tmp_path / "straight" / "eval.json").read_text())
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def lines(p):
        return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in (p / "metrics.jsonl").read_text().splitlines()]

    assert lines(killed) == lines(tmp_path / "straight")


def test_two_process_run_matches_one_process_with_the_same_global_batch(trained, tmp_path):
    cfg, one, _ = trained
    proc = torchrun_train(cfg, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    # the same loss at every logged step...
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(one), rel=1e-4)
    # ...and the same weights, up to float summation order (attention key biases get no true
    # gradient, only rounding noise that Adam rescales, so compare whole-model relative error)
    assert relative_weight_gap(one / "model.safetensors", tmp_path / "two" / "model.safetensors") < 1e-3
    ea, eb = json.loads((one / "eval.json").read_text()), json.loads((tmp_path / "two" / "eval.json").read_text())
    for d in ea["dims"]:
        for direction, block in ea["dims"][d].items():
            for k, v in block.items():
                assert abs(v - eb["dims"][d][direction][k]) <= 2.5, (d, direction, k)


def test_training_from_the_cache_equals_training_on_live_encoding(coco_subset, tmp_path):
    """Cached frozen features are a pure speed-up: the loss curve is the one of re-encoding every step."""
    cfg = write_config(tmp_path / "c.yaml", coco_subset, epochs=1, log_every=1)
    run("train", str(cfg), "--out", str(tmp_path / "cached"), "--no-progress", "--set", "cache.dtype=float32")
    run("train", str(cfg), "--out", str(tmp_path / "live"), "--no-progress", "--set", "cache.enabled=false")

    def losses(run_dir):
        return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in l]

    assert len(losses(tmp_path / "live")) == 11
    assert losses(tmp_path / "live") == pytest.approx(losses(tmp_path / "cached"), rel=1e-4)


def test_gradient_accumulation_takes_one_optimizer_step_per_accumulated_batch(coco_subset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", coco_subset, epochs=2, grad_accum=2, batch_size=8, select="best")
    run("train", str(cfg), "--out", str(tmp_path / "acc"), "--no-progress")
    summary = json.loads((tmp_path / "acc" / "summary.json").read_text())
    assert summary["steps_per_epoch"] == 180 // 16 and summary["steps"] == 2 * (180 // 16)
    assert (tmp_path / "acc" / "best.safetensors").is_file()
    assert 0 < summary["selected_step"] <= summary["steps"]
