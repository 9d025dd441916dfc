"""Bad input ends in one line ``error: <path or key>: <what>`` and exit status 2, never a
traceback; damaged run files are named along with how to recover them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from edge_glass.cli import main

EDGE_GLASS = [sys.executable, "-m", "edge_glass.cli"]


@pytest.fixture(scope="module")
def trained(coco_subset, tmp_path_factory) -> Path:
    """One tiny image+text alignment run (11 steps), shared by the module; tests that damage it copy it."""
    root = tmp_path_factory.mktemp("cli_errors")
    cfg = {
        "name": "tiny",
        "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
        "model": {"dims": [64, 32], "heads": {"image": {"pooler": {"type": "perceiver", "dim": 64, "latents": 8, "depth": 1, "heads": 4}}}},
        "data": {"train": [f"coco:{coco_subset}"], "split": {"val": 4, "test": 8}},
        "train": {"epochs": 1, "batch_size": 16, "checkpoint_every": 5, "log_every": 3, "threads": 1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*EDGE_GLASS, "train", str(root / "tiny.yaml"), "--out", str(root / "run"), "--no-progress"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)  # the in-process commands below: stay light on a shared machine
    return root / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def no_model(monkeypatch):
    """For errors that must come before any work: loading the run's model fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr("edge_glass.api.load", load)


@pytest.fixture
def texts(tmp_path) -> Path:
    (tmp_path / "t.txt").write_text("a dog\nthe sea\n")
    return tmp_path / "t.txt"


def fails(capsys, *argv: str) -> str:
    """Runs the CLI in-process; it must exit 2 with exactly one line on stderr: the error."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needed to make a folder unwritable even for root): {proc.stderr.strip() or 'mount failed'}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# --- damaged run directory ---------------------------------------------------------------------


def test_eval_of_a_truncated_model_names_the_file_and_the_checkpoint_to_rebuild_it(run_copy, capsys):
    f = run_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = fails(capsys, "eval", run_copy, "--no-progress")
    assert err.startswith(f"error: {f}: not a readable safetensors file, truncated or corrupt")
    assert f"rebuild it from the last checkpoint {run_copy / 'checkpoints' / 'step-00000011'} with: " \
           f"edge-glass train {run_copy / 'config.yaml'} --out {run_copy} --resume" in err


def test_eval_of_an_empty_model_names_the_file_and_the_checkpoint(run_copy, capsys):
    (run_copy / "model.safetensors").write_bytes(b"")
    err = fails(capsys, "eval", run_copy, "--no-progress")
    assert err.startswith(f"error: {run_copy / 'model.safetensors'}: empty file")
    assert str(run_copy / "checkpoints" / "step-00000011") in err


def test_the_suggested_command_rebuilds_a_damaged_model(trained, run_copy, capsys):
    (run_copy / "model.safetensors").write_bytes(b"")
    err = fails(capsys, "eval", run_copy, "--no-progress")
    command = err.split(" with: edge-glass ")[1].split()
    proc = subprocess.run([*EDGE_GLASS, *command, "--no-progress"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt, original = load_file(str(run_copy / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in rebuilt)
    assert json.loads((run_copy / "eval.json").read_text()) == json.loads((trained / "eval.json").read_text())
    kinds = [json.loads(line)["kind"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("test") == 1  # re-evaluated, not logged twice


@pytest.mark.parametrize("garbage", [b"\x00\xff\xfe\x81binary\x00\x9c" * 20, b"name: tiny\nmodel: {dims: [64, 32\n  - : :\n"], ids=["binary", "invalid-yaml"])
def test_a_corrupt_run_config_is_named(run_copy, capsys, garbage):
    (run_copy / "config.yaml").write_bytes(garbage)
    err = fails(capsys, "eval", run_copy, "--no-progress")
    assert err.startswith(f"error: {run_copy / 'config.yaml'}: corrupt run config")


# --- bad embed arguments ----------------------------------------------------------------------


def test_embed_audio_with_a_run_without_audio(trained, tmp_path, capsys):
    (tmp_path / "wavs").mkdir()
    with wave.open(str(tmp_path / "wavs" / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, dtype=np.int16).tobytes())
    err = fails(capsys, "embed", trained, "--audio", tmp_path / "wavs", "--out", tmp_path / "a.npz")
    assert err == f"error: {trained}: this run has no audio encoder (it embeds image, text)"
    assert not (tmp_path / "a.npz").exists()


def test_embed_texts_from_a_missing_file(trained, tmp_path, capsys, no_model):
    err = fails(capsys, "embed", trained, "--texts", tmp_path / "nope.txt", "--out", tmp_path / "t.npz")
    assert err == f"error: --texts {tmp_path / 'nope.txt'}: file not found"


def test_embed_texts_from_a_latin1_file_names_the_line(trained, tmp_path, capsys, no_model):
    (tmp_path / "t.txt").write_bytes("a dog\nun caf\xe9\n".encode("latin-1"))
    err = fails(capsys, "embed", trained, "--texts", tmp_path / "t.txt", "--out", tmp_path / "t.npz")
    assert err == f"error: --texts {tmp_path / 't.txt'}: line 2 is not UTF-8 (byte 0xe9); re-save the file as UTF-8"


def test_embed_into_a_missing_folder_fails_before_any_work(trained, tmp_path, texts, capsys, no_model):
    out = tmp_path / "missing_folder" / "x.npz"
    err = fails(capsys, "embed", trained, "--texts", texts, "--out", out)
    assert err == f"error: --out {out}: folder {out.parent} does not exist"
    assert not out.parent.exists()


def test_embed_dim_zero_is_an_error(trained, tmp_path, texts, capsys, no_model):
    err = fails(capsys, "embed", trained, "--texts", texts, "--out", tmp_path / "t.npz", "--dim", "0")
    assert err.startswith("error: --dim 0: must be a positive embedding size")
    assert not (tmp_path / "t.npz").exists()


def test_embed_dim_above_the_trained_dims_is_an_error(trained, tmp_path, texts, capsys):
    err = fails(capsys, "embed", trained, "--texts", texts, "--out", tmp_path / "t.npz", "--dim", "65")
    assert err == "error: --dim 65: outside 1..64 (trained dims: [64, 32])"


def test_embed_into_a_read_only_folder(trained, tmp_path, texts, capsys, no_model):
    # chmod 0o555 does not stop root (os.access and open both say yes), a read-only mount does
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        out = ro / "x.npz"
        err = fails(capsys, "embed", trained, "--texts", texts, "--out", out)
        assert err == f"error: --out {out}: folder {ro} is not writable"


def test_embed_onto_a_full_disk(trained, tmp_path, texts, capsys):
    with tmpfs(tmp_path / "full", "size=256k") as full:
        with open(full / "filler", "wb", buffering=0) as f:  # fill the disk up to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        out = full / "x.npz"
        err = fails(capsys, "embed", trained, "--texts", texts, "--out", out)
        assert err == f"error: {out}: cannot write (no space left on the device)"
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no temporary file left


# --- eval on a dataset with a bad sample --------------------------------------------------------


def test_eval_names_the_skipped_corrupt_image(trained, tmp_path, data_root, capsys):
    (tmp_path / "images").mkdir()
    lines = ["image,caption"]
    for i, f in enumerate(sorted((data_root / "coco1k" / "images").iterdir())[200:204]):
        shutil.copy(f, tmp_path / "images" / f"{i}.jpg")
        lines += [f"{i}.jpg,a photo number {i}", f"{i}.jpg,another caption {i}"]
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines.append("broken.jpg,a broken image")
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    report = tmp_path / "m.json"
    assert main(["eval", str(trained), "--data", f"flickr8k:{tmp_path}", "--json", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 samples" in out
    assert any("broken.jpg" in line for line in out.splitlines() if line.startswith("  "))
    m = json.loads(report.read_text())
    assert m["skipped"] == 1 and m["n_images"] == 4
    (skipped,) = m["skipped_samples"]
    assert "broken.jpg" in json.dumps(skipped)
