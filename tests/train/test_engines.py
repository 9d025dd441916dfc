"""Engines and trackers: the accelerate launch configs, checkpoints through Accelerate's
save_state / load_state (exact round trip, atomic publish, the older format), multi-process runs
through `accelerate launch`, DeepSpeed / FSDP launches on a machine without GPUs, and the
trackers (TensorBoard, offline W&B, metrics.jsonl's throughput and memory)."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import write_config
from safetensors.torch import load_file, save_file
from torch import nn

from edge_glass.errors import EdgeGlassError
from edge_glass.train.checkpoint import Checkpointer, latest_checkpoint
from edge_glass.train.logging import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "configs" / "accelerate"
EDGE_GLASS = [sys.executable, "-m", "edge_glass.cli"]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# name -> (distributed type, processes)
CONFIGS = {"1gpu": ("NO", 1), "2gpu_ddp": ("MULTI_GPU", 2), "2gpu_zero2": ("DEEPSPEED", 2), "2gpu_fsdp": ("FSDP", 2), "2cpu": ("MULTI_GPU", 2)}


def launch(config: str, *args: str, env: dict | None = None, script: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/CONFIG.yaml -m edge_glass.cli ARGS` (a free
    port), or SCRIPT ARGS in place of the CLI module."""
    program = [str(script)] if script else ["-m", "edge_glass.cli"]
    cmd = [ACCELERATE, "launch", "--config_file", str(LAUNCH / f"{config}.yaml"), "--main_process_port", "0", *program, *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE_GLASS, *args], check=False, capture_output=True, text=True, env={**os.environ, **(env or {})})


def train_losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "train"]


# --- launch configs ---------------------------------------------------------------------------


def test_the_shipped_launch_configs_are_the_five_engines():
    assert sorted(p.stem for p in LAUNCH.glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_launch_config_loads_with_accelerates_own_config_classes(name, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    path = LAUNCH / f"{name}.yaml"
    cfg = load_config_from_file(str(path))  # unknown top-level keys raise here
    kind, processes = CONFIGS[name]
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type.value == kind and cfg.num_processes == processes
    parser = launch_command_parser()
    args, defaults, from_config = _validate_launch_command(parser.parse_args(["--config_file", str(path), "-m", "edge_glass.cli", "train", "c.yaml"]))
    known = {a.dest for a in parser._actions}  # every nested key must be a launch option (the launcher skips unknown ones silently)
    nested = [f"fsdp_{k}" if not k.startswith("fsdp") else k for k in defaults.fsdp_config] + list(defaults.deepspeed_config)
    assert set(nested) <= known, set(nested) - known
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as accelerate launch does
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    for k, v in env.items():  # the environment the training processes get
        monkeypatch.setenv(k, v)
    if kind == "FSDP":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        assert plugin.auto_wrap_policy is None  # NO_WRAP: the whole model one shard unit
    elif kind == "DEEPSPEED":
        plugin = DeepSpeedPlugin()
        ds = plugin.deepspeed_config
        assert plugin.zero_stage == 2 and ds["zero_optimization"]["stage"] == 2
        # the loop fills these from the experiment config (configure_engine), so the file leaves them to it
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    elif name == "2cpu":
        assert cfg.use_cpu and args.multi_gpu  # torchrun with two processes; Accelerator(cpu=True) makes them gloo DDP
    assert env.get("ACCELERATE_USE_FSDP") == ("true" if kind == "FSDP" else None)


# --- checkpoints through save_state / load_state ---------------------------------------------------


class Tiny(nn.Module):
    """Dropout draws from the torch RNG every step: a resumed run matches only with the RNG restored."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


def training_process(seed: int):
    """What a (re)started training process has after ``prepare``: its own accelerator, model,
    optimizer and LR scheduler (the scheduler depends on the step count)."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    core = Tiny()
    optimizer = torch.optim.AdamW(core.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(core, optimizer)
    return acc, model, core, optimizer, scheduler


def steps(acc, model, optimizer, scheduler, n: int) -> list[float]:
    """n optimizer steps on inputs drawn from the torch RNG; their losses."""
    out = []
    for _ in range(n):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean() + 0.01 * np.random.rand() + 0.01 * random.random()
        acc.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


def test_save_state_and_load_state_round_trip_resumes_exactly(tmp_path):
    acc, model, core, optimizer, scheduler = training_process(seed=0)
    steps(acc, model, optimizer, scheduler, 3)
    path = Checkpointer(tmp_path, 2, acc, core, scheduler).save(3, {"running_loss": 0.5})
    assert sorted(p.name for p in path.iterdir()) == ["custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "state.json"]
    assert set(load_file(str(path / "model.safetensors"))) == set(core.state_dict())  # our names, not the wrapper's
    expected = steps(acc, model, optimizer, scheduler, 4)
    weights = {k: v.clone() for k, v in core.state_dict().items()}

    acc2, model2, core2, optimizer2, scheduler2 = training_process(seed=1)  # another init: everything must come from the checkpoint
    torch.manual_seed(123)
    state = Checkpointer(tmp_path, 2, acc2, core2, scheduler2).load(latest_checkpoint(tmp_path))
    assert state == {"running_loss": 0.5, "step": 3}
    assert steps(acc2, model2, optimizer2, scheduler2, 4) == expected
    assert all(torch.equal(weights[k], v) for k, v in core2.state_dict().items())
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_a_checkpoint_is_kept_only_keep_deep_and_latest_names_the_newest(tmp_path):
    acc, model, core, optimizer, scheduler = training_process(seed=0)
    ckpt = Checkpointer(tmp_path, 2, acc, core, scheduler)
    for step in (1, 2, 3):
        steps(acc, model, optimizer, scheduler, 1)
        ckpt.save(step, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"


KILL_AT_RENAME = """
import os, signal, sys, pathlib, torch
sys.path[:0] = [sys.argv[2], str(pathlib.Path(sys.argv[2]).parent)]  # tests/train (this module), tests (helpers)
from test_engines import training_process, steps
from edge_glass.train.checkpoint import Checkpointer
acc, model, core, optimizer, scheduler = training_process(seed=0)
ckpt = Checkpointer(pathlib.Path(sys.argv[1]), 2, acc, core, scheduler)
steps(acc, model, optimizer, scheduler, 2)
ckpt.save(2, {"tag": "first"})
steps(acc, model, optimizer, scheduler, 2)
pathlib.Path.rename = lambda self, target: os.kill(os.getpid(), signal.SIGKILL)  # dies between writing and publishing
ckpt.save(4, {"tag": "second"})
"""


def test_a_process_killed_between_writing_and_renaming_leaves_latest_at_the_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(tmp_path), str(Path(__file__).parent)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    torn = ckpts / ".tmp-step-00000004"
    assert {"state.json", "model.safetensors", "optimizer.bin"} <= {p.name for p in torn.iterdir()}  # written in full, never published
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert latest_checkpoint(tmp_path) == ckpts / "step-00000002"

    acc, model, core, optimizer, scheduler = training_process(seed=1)  # the restart
    ckpt = Checkpointer(tmp_path, 2, acc, core, scheduler)
    assert not torn.exists()
    assert ckpt.load(latest_checkpoint(tmp_path))["tag"] == "first"
    first = load_file(str(ckpts / "step-00000002" / "model.safetensors"))
    assert all(torch.equal(first[k], v) for k, v in core.state_dict().items())


def save_legacy(path: Path, core, optimizer, scheduler, state: dict) -> None:
    """A checkpoint as edge-glass wrote it before Accelerate's save_state (its format, spelled out)."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in core.state_dict().items()}, str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    torch.save({"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
                "torch": torch.get_rng_state()}, path / "rng-0.pt")
    (path / "state.json").write_text(json.dumps(state))


def test_a_checkpoint_of_the_older_format_still_resumes_exactly(tmp_path):
    acc, model, core, optimizer, scheduler = training_process(seed=0)
    steps(acc, model, optimizer, scheduler, 3)
    save_legacy(tmp_path / "checkpoints" / "step-00000003", core, optimizer, scheduler, {"step": 3})
    expected = steps(acc, model, optimizer, scheduler, 3)

    acc2, model2, core2, optimizer2, scheduler2 = training_process(seed=1)
    assert Checkpointer(tmp_path, 2, acc2, core2, scheduler2).load(latest_checkpoint(tmp_path)) == {"step": 3}
    assert steps(acc2, model2, optimizer2, scheduler2, 3) == expected


def test_a_checkpoint_that_does_not_fit_the_model_names_the_file(tmp_path):
    acc, model, core, optimizer, scheduler = training_process(seed=0)
    path = Checkpointer(tmp_path, 2, acc, core, scheduler).save(1, {})
    save_file({"net.0.weight": torch.zeros(16, 4)}, str(path / "model.safetensors"))  # the rest is missing
    acc2, _, core2, _, scheduler2 = training_process(seed=0)
    with pytest.raises(EdgeGlassError, match=rf"^{path / 'model.safetensors'}: checkpoint does not fit the model"):
        Checkpointer(tmp_path, 2, acc2, core2, scheduler2).load(path)


def test_a_run_whose_config_yaml_predates_the_tracker_keys_still_resumes(tmp_path):
    from edge_glass.config import dump_config
    from edge_glass.runs import RunDir
    from edge_glass.train.loop import _prepare_run_dir

    cfg = write_config_dict()
    old = yaml.safe_load(dump_config(cfg))
    del old["train"]["log_with"], old["train"]["project"]  # as runs before train.log_with wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    _prepare_run_dir(RunDir(tmp_path), cfg, resume=True)  # the same run: no error
    assert (tmp_path / "config.yaml").read_text() == dump_config(cfg)
    changed = write_config_dict()
    changed.train.lr = 0.5
    with pytest.raises(EdgeGlassError, match=r"cannot resume with a different config:\n--- saved\n\+\+\+ now\n@@ .* @@\n-  lr: 0.001\n\+  lr: 0.5$"):
        _prepare_run_dir(RunDir(tmp_path), changed, resume=True)


# --- engines, launched ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(coco_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    cfg = write_config(root / "tiny.yaml", coco_subset, epochs=2, checkpoint_every=8)
    one = root / "one"
    proc = cli("train", str(cfg), "--out", str(one), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, one


def test_two_cpu_processes_through_accelerate_launch_match_one_process(tiny, tmp_path):
    cfg, one = tiny
    proc = launch("2cpu", "train", str(cfg), "--out", str(tmp_path / "two"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "MULTI_CPU"
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(one), rel=1e-4)  # negatives gathered from both processes
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000022").iterdir()) == [
        "custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "state.json"]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    va, vb = torch.cat([a[k].flatten() for k in sorted(a)]), torch.cat([b[k].flatten() for k in sorted(b)])
    assert ((va - vb).norm() / va.norm()).item() < 1e-3


def test_a_tracker_that_cannot_start_on_the_main_process_stops_every_process(tiny, tmp_path):
    cfg, _ = tiny
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("a file where TensorBoard's folder goes")
    cmd = [ACCELERATE, "launch", "--config_file", str(LAUNCH / "2cpu.yaml"), "--main_process_port", "0", "-m", "edge_glass.cli",
           "train", str(cfg), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)  # not left waiting in a collective
    assert proc.returncode != 0
    assert "error: train.log_with: cannot start the trackers ['tensorboard']" in proc.stderr
    assert "error: another process failed (its error is above); stopping this one too" in proc.stderr


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("config,engine", [("2gpu_fsdp", "FSDP"), ("2gpu_zero2", "DEEPSPEED")])
def test_a_sharding_launch_without_gpus_stops_at_once_with_the_reason(config, engine, tiny, tmp_path):
    if gpus() >= 2:
        pytest.skip("this machine has GPUs: the launch would run (scripts/gpu_check.sh trains under it)")
    cfg, _ = tiny
    proc = launch(config, "train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode != 0
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        assert "DeepSpeed is not installed" in proc.stderr  # accelerate launch itself says so
    else:
        assert f"the launch asks for {engine} (ACCELERATE_USE_{'FSDP' if engine == 'FSDP' else 'DEEPSPEED'}=true), but Accelerate" in proc.stderr
        assert "set up MULTI_CPU on cpu" in proc.stderr
    assert "data:" not in proc.stdout  # it stopped before reading any data
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_launch_trains_like_ddp(tmp_path, vlm_tiny):
    """FSDP through the shipped launch config, unpatched. Where Accelerate cannot run FSDP (CPU
    processes), the skip reason is the run's own error, checked to be that limitation."""
    cfg, _ = vlm_tiny
    proc = launch("2gpu_fsdp", "train", str(cfg), "--out", str(tmp_path / "fsdp"), "--no-progress")
    if proc.returncode != 0:
        reason = next((l for l in proc.stderr.splitlines() if "the launch asks for FSDP" in l), None)
        assert reason is not None and "never on CPU processes" in reason and gpus() < 2, proc.stderr[-3000:]
        pytest.skip(reason.removeprefix("error: "))
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["engine"] == "FSDP"
    proc = launch("2gpu_ddp", "train", str(cfg), "--out", str(tmp_path / "ddp"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "ddp"), rel=1e-3)


FSDP_ON_CPU = """
import sys
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

init = AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin or self._shared_state.get("fsdp_plugin")  # every AcceleratorState() derives the type again
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = fsdp_on_cpu
from edge_glass.cli import main

sys.exit(main())
"""


def test_fsdp2_on_cpu_processes_trains_like_ddp_and_resumes_exactly_from_sharded_checkpoints(vlm_tiny, tmp_path):
    """Accelerate's FSDP2 engine (fully_shard over gloo, sharded save_state / load_state by both
    ranks) on CPU processes: Accelerate 1.15 sets FSDP up only on accelerators, so its state is
    switched from MULTI_CPU to FSDP (the script above); everything after that is the real engine."""
    cfg, _ = vlm_tiny
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    proc = launch("2gpu_fsdp", "train", str(cfg), "--out", str(fsdp), "--no-progress", script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((fsdp / "summary.json").read_text())["engine"] == "FSDP"
    step5 = fsdp / "checkpoints" / "step-00000005"
    assert {"pytorch_model_fsdp_0", "optimizer_0", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in step5.iterdir()}
    assert sorted(p.name for p in (step5 / "pytorch_model_fsdp_0").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]

    proc = launch("2cpu", "train", str(cfg), "--out", str(ddp), "--no-progress")  # the same two processes under DDP
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(fsdp) == pytest.approx(train_losses(ddp), rel=1e-4)
    a, b = load_file(str(fsdp / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert set(a) == set(b)
    va, vb = torch.cat([a[k].flatten() for k in sorted(a)]), torch.cat([b[k].flatten() for k in sorted(b)])
    assert ((va - vb).norm() / va.norm()).item() < 1e-4

    def lines():
        return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in (fsdp / "metrics.jsonl").read_text().splitlines()]

    before, weights = lines(), a
    for later in (fsdp / "checkpoints").glob("step-*"):  # back to the sharded checkpoint of step 5
        if later.name != step5.name:
            shutil.rmtree(later)
    (fsdp / "checkpoints" / "latest").write_text("step-00000005\n")
    proc = launch("2gpu_fsdp", "train", str(cfg), "--out", str(fsdp), "--no-progress", "--resume", script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {step5}" in proc.stdout
    assert lines() == before
    after = load_file(str(fsdp / "model.safetensors"))
    assert all(torch.equal(after[k], weights[k]) for k in weights)


@pytest.fixture(scope="module")
def vlm_tiny(tmp_path_factory):
    """A tiny decoder on easy-VQA (no 0-dim parameters, so FSDP can shard it)."""
    pytest.importorskip("easy_vqa")
    root = tmp_path_factory.mktemp("vlm_engines")
    cfg = {"task": "vlm", "name": "vlm_engines", "projector": {"pool": "mean", "hidden": 64},
           "decoder": {"type": "tiny", "d_model": 64, "n_layers": 2, "n_heads": 4},
           "data": {"train": ["easy-vqa:train"], "max_samples": 400, "val": 0.1, "test": 0.1},
           "train": {"epochs": 1, "batch_size": 32, "lr": 2.0e-3, "threads": 1, "checkpoint_every": 5, "log_every": 2},
           "eval": {"max_new_tokens": 3, "samples": 2}}
    (root / "vlm.yaml").write_text(yaml.safe_dump(cfg))
    return root / "vlm.yaml", cfg


def test_the_models_fsdp_can_and_cannot_shard():
    """FSDP refuses 0-dim parameters (torch: "FSDP doesn't support scalar parameters"), so the loop
    stops an FSDP launch of such a model before preparing it: the alignment model's temperatures."""
    from edge_glass.models.alignment import AlignmentModel
    from edge_glass.train.loop import scalar_parameters

    tiny = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    assert scalar_parameters(tiny) == []
    cfg = write_config_dict()
    core = AlignmentModel(cfg.model, cfg.loss, {"image": 16, "text": 8}, {})
    assert scalar_parameters(core) == ["logit_scales.image__text"]


def write_config_dict():
    from edge_glass.config import config_from_dict

    return config_from_dict({"encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
                             "model": {"dims": [8, 4]}, "data": {"train": ["coco:x"]}})


# --- trackers ---------------------------------------------------------------------------------------


def test_trackers_write_tensorboard_events_an_offline_wandb_run_and_throughput_to_metrics_jsonl(coco_subset, tmp_path):
    pytest.importorskip("wandb")
    cfg = write_config(tmp_path / "c.yaml", coco_subset, epochs=1, log_every=2)
    out = tmp_path / "run"
    proc = cli("train", str(cfg), "--out", str(out), "--no-progress", "--set", "train.log_with=[tensorboard, wandb]",
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    assert len(train) == 6
    for line in train:
        assert line["samples_per_sec"] > 0 and line["memory"]["cpu_rss_mb"] > 100
        assert set(line["loss_pair"]) == {"image-text"} and set(line["loss_dim"]) == {"64", "32"}
        # one pair, uniform Matryoshka weights: the loss is the pair's, the mean of the per-dim losses
        assert line["loss_pair"]["image-text"] == pytest.approx(line["loss"], rel=1e-6)
        assert sum(line["loss_dim"].values()) / 2 == pytest.approx(line["loss"], rel=1e-6)
        assert 0 < line["temperature"]["image__text"] < 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    tb = EventAccumulator(str(events.parent))
    tb.Reload()
    assert {"train/loss", "train/loss_dim/64", "train/samples_per_sec", "train/memory/cpu_rss_mb", "val/score"} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("train/loss")] == [l["step"] for l in train]
    assert [e.value for e in tb.Scalars("train/loss")] == pytest.approx([l["loss"] for l in train], rel=1e-6)

    (wandb_run,) = list((out / "wandb").glob("offline-run-*"))
    (log,) = list(wandb_run.glob("run-*.wandb"))
    assert log.stat().st_size > 0 and b"train/loss" in log.read_bytes()


def test_config_rejects_an_unknown_tracker_with_its_key_path(coco_subset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    proc = cli("train", str(cfg), "--out", str(tmp_path / "r"), "--set", "train.log_with=[tensorboard, tensorbored]")
    assert proc.returncode == 2
    assert "train.log_with.1: Input should be 'tensorboard', 'wandb', 'mlflow'" in proc.stderr and "(got 'tensorbored')" in proc.stderr


def test_the_known_trackers_are_accelerates():
    from accelerate.utils import LoggerType

    from edge_glass.config import TRACKERS
    from edge_glass.train.logging import PACKAGES

    assert set(TRACKERS) == set(LoggerType.list()) - {"all"} == set(PACKAGES)


def test_a_tracker_whose_package_is_missing_is_one_line_before_any_data(coco_subset, tmp_path):
    from edge_glass.train.logging import PACKAGES

    missing = [name for name, package in PACKAGES.items() if importlib.util.find_spec(package) is None]
    if not missing:
        pytest.skip("every tracker's package is installed here")
    cfg = write_config(tmp_path / "c.yaml", coco_subset)
    proc = cli("train", str(cfg), "--out", str(tmp_path / "r"), "--no-progress", "--set", f"train.log_with=[{missing[0]}]")
    assert proc.returncode == 2
    assert [l for l in proc.stderr.splitlines() if l.strip()] == [
        f"error: train.log_with: {missing[0]} not installed (pip install {PACKAGES[missing[0]]}, or pip install 'edge-glass[trackers]' for wandb and mlflow)"]
