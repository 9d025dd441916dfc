"""Run-directory safety: one trainer per run directory, resumable after a kill at any moment,
checkpoints that survive a full disk and cannot run code."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_glass.errors import EdgeGlassError
from edge_glass.train.checkpoint import Checkpointer
from edge_glass.train.lock import RunLock
from edge_glass.train.logging import parse_line

EDGE_GLASS = [sys.executable, "-m", "edge_glass.cli"]


from helpers import write_config as _write_config


def write_config(path: Path, coco_dir: Path, **train) -> Path:
    return _write_config(path, coco_dir, **{"epochs": 1, **train})


def start(args: list[str], logs: Path) -> subprocess.Popen:
    """A CLI process in the background, its stdout/stderr in files (never a full pipe)."""
    return subprocess.Popen([*EDGE_GLASS, *args], stdout=open(logs.with_suffix(".out"), "w"), stderr=open(logs.with_suffix(".err"), "w"))


def wait_for(cond, proc: subprocess.Popen, logs: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be caught:\n{logs.with_suffix('.err').read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def lock_holder(run_dir: Path) -> str:
    try:
        return (run_dir / ".lock").read_text().strip()
    except OSError:
        return ""


def latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@contextmanager
def tmpfs(path: Path, options: str):
    """A tiny real file system at ``path`` (a real full or read-only disk, even for root); skips
    where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk ({proc.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# --- one trainer per run directory ------------------------------------------------------------


def test_a_second_trainer_on_the_same_run_dir_fails_at_once_and_the_first_finishes(coco_subset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    out = tmp_path / "run"
    args = ["train", str(cfg), "--out", str(out), "--resume", "--no-progress"]
    first = start(args, tmp_path / "first")
    try:
        wait_for(lambda: lock_holder(out) == str(first.pid), first, tmp_path / "first")
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock for as long as the second one needs
        try:
            second = subprocess.run([*EDGE_GLASS, *args], check=False, capture_output=True, text=True, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert error_lines(second.stderr) == [
            (f"error: {out}: another training process (pid {first.pid}) is using this run directory; "
             "wait for it or stop it, or pass another --out")]
        assert "data:" not in second.stdout  # it stopped before reading any data
        assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (out / "eval.json").is_file()
    steps = [m["step"] for m in metric_lines(out) if m["kind"] == "train"]
    assert steps == [3, 6, 9, 11]  # the first run's metrics, untouched by the second


def test_the_lock_dies_with_a_sigkilled_trainer(coco_subset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    out = tmp_path / "run"
    proc = start(["train", str(cfg), "--out", str(out), "--no-progress"], tmp_path / "killed")
    wait_for(lambda: lock_holder(out) == str(proc.pid), proc, tmp_path / "killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_holder(out) == str(proc.pid)  # the file stays, naming a dead process...
    lock = RunLock(out)
    lock.acquire()  # ...but the kernel released its flock: --resume can take the run over
    try:
        assert lock_holder(out) == str(os.getpid())
        with pytest.raises(EdgeGlassError, match=rf"another training process \(pid {os.getpid()}\)"):
            RunLock(out).acquire()
    finally:
        lock.release()
    RunLock(out).acquire()  # released means released


def test_training_into_a_read_only_folder_is_one_line(coco_subset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        proc = subprocess.run([*EDGE_GLASS, "train", str(cfg), "--out", str(ro / "run"), "--no-progress"], check=False, capture_output=True, text=True)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"error: {ro / 'run'}: cannot write (read-only file system)"]


# --- resume after a kill mid-write ------------------------------------------------------------


def test_a_metrics_line_torn_by_a_kill_does_not_block_resume(coco_subset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", coco_subset, epochs=2, log_every=1)
    out = tmp_path / "run"
    args = ["train", str(cfg), "--out", str(out), "--no-progress"]
    proc = start(args, tmp_path / "killed")

    def logged_past_a_checkpoint() -> bool:
        ckpt = latest_step(out)
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        return ckpt >= 5 and any(f'"step": {s},' in line for line in lines for s in (ckpt + 1, ckpt + 2))

    wait_for(logged_past_a_checkpoint, proc, tmp_path / "killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "eval.json").exists(), "the run finished before it could be killed"
    ckpt = latest_step(out)
    data = (out / "metrics.jsonl").read_bytes()
    before = [parse_line(line) for line in data.decode(errors="replace").splitlines()]
    if before[-1] is None:  # the kill itself tore the last line
        torn = data
    elif before[-1]["step"] > ckpt:  # what a kill while writing the last line leaves: half of it
        last = data.rstrip(b"\n").rfind(b"\n") + 1
        torn = data[: last + (len(data) - last) // 2]
    else:  # (rare: killed between the checkpoint and the next line) half of that next line
        torn = data + json.dumps({"step": ckpt + 1, "kind": "train", "loss": 1.25, "lr": 1e-4}).encode()[:20]
    before = [m for m in before if m is not None]
    (out / "metrics.jsonl").write_bytes(torn)
    with pytest.raises(json.JSONDecodeError):
        [json.loads(line) for line in torn.decode(errors="replace").splitlines()]

    proc = subprocess.run([*EDGE_GLASS, *args, "--resume"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step-{ckpt:08d}'}" in proc.stdout
    after = metric_lines(out)  # every line parses
    assert [m["step"] for m in after if m["kind"] == "train"] == list(range(1, 23))
    assert [m["kind"] for m in after].count("test") == 1
    assert [m for m in after if m["step"] <= ckpt] == [m for m in before if m["step"] <= ckpt]


# --- full disk -----------------------------------------------------------------------------


def test_a_checkpoint_that_does_not_fit_on_the_disk_leaves_the_previous_one(coco_subset, tmp_path):
    """A real full disk: checkpoints/ on a 3 MB tmpfs holds one checkpoint (~2 MB), not two."""
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = ["train", str(cfg), "--out", str(out), "--no-progress"]
    with tmpfs(ckpts, "size=3m"):
        proc = subprocess.run([*EDGE_GLASS, *args], check=False, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert error_lines(proc.stderr) == [f"error: {ckpts / 'step-00000010'}: cannot write (no space left on the device)"]
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000005"]  # no .tmp-step-* left
        assert latest_step(out) == 5

        # the disk grows; a killed run's leftover temporary checkpoint is cleared on the next start
        subprocess.run(["mount", "-o", "remount,size=64m", str(ckpts)], check=True)
        (ckpts / ".tmp-step-00000007").mkdir()
        (ckpts / ".tmp-step-00000007" / "model.safetensors").write_bytes(b"\0" * 1000)
        proc = subprocess.run([*EDGE_GLASS, *args, "--resume"], check=False, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resuming from {ckpts / 'step-00000005'}" in proc.stdout  # the previous checkpoint loads
        assert not list(ckpts.glob(".tmp-step-*"))
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000010", "step-00000011"]
    assert (out / "eval.json").is_file()


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-00000042"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"torn")
    done = tmp_path / "checkpoints" / "step-00000040"
    done.mkdir()
    _checkpointer(tmp_path)
    assert not stale.exists() and done.is_dir()


# --- checkpoints cannot run code; RNG states round-trip ------------------------------------------


def _touch(path: str) -> None:
    Path(path).write_text("code from a checkpoint ran")


class Payload:
    """An object of an arbitrary class whose unpickling runs code (here: writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def _tiny_training_state():
    """A prepared model, optimizer and scheduler one step in, as a (re)started training process has them."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    core = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(core.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(core, optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return acc, core, scheduler


def _checkpointer(run_dir: Path) -> Checkpointer:
    """A fresh training process's checkpointer (its own accelerator, model and optimizer)."""
    acc, core, scheduler = _tiny_training_state()
    return Checkpointer(run_dir, keep=2, acc=acc, core=core, scheduler=scheduler)


STATE = {"epoch": 0, "batch_in_epoch": 1, "total_steps": 9, "running_loss": 0.5, "steps_since_log": 1, "best_score": 1.0, "best_step": 1}


def test_a_checkpoint_holding_an_arbitrary_object_is_refused_without_running_it(tmp_path):
    path = _checkpointer(tmp_path).save(1, STATE)
    marker = tmp_path / "marker"
    torch.save(Payload(marker), path / "optimizer.bin")
    with pytest.raises(EdgeGlassError, match=rf"^{path / 'optimizer.bin'}: cannot be loaded safely"):
        _checkpointer(tmp_path).load(path)
    assert not marker.exists()  # nothing of the payload ran
    torch.load(path / "optimizer.bin", weights_only=False)  # (what loading it unsafely would have done)
    assert marker.read_text() == "code from a checkpoint ran"


def test_a_torn_checkpoint_file_is_refused_with_its_name(tmp_path):
    path = _checkpointer(tmp_path).save(1, STATE)
    scheduler_file = path / "custom_checkpoint_0.pkl"  # the registered LR scheduler
    data = scheduler_file.read_bytes()
    scheduler_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeGlassError, match=rf"^{scheduler_file}: cannot be loaded safely"):
        _checkpointer(tmp_path).load(path)
    scheduler_file.write_bytes(data)
    (path / "model.safetensors").unlink()
    with pytest.raises(EdgeGlassError, match=rf"^{path / 'model.safetensors'}: missing"):
        _checkpointer(tmp_path).load(path)


def _draws() -> list:
    return [random.random(), random.gauss(0, 1), random.randrange(10**9),
            np.random.rand(3).tolist(), float(np.random.standard_normal()), np.random.randint(0, 10**9, 4).tolist(),
            torch.rand(3).tolist(), torch.randn(2).tolist(), torch.randint(0, 10**9, (4,)).tolist()]


def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    ckpt = _checkpointer(tmp_path)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second normal in each generator's state
    np.random.standard_normal()
    path = ckpt.save(1, STATE)
    expected = _draws()
    fresh = _checkpointer(tmp_path)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    state = fresh.load(path)
    assert _draws() == expected
    assert state == {**STATE, "step": 1}
