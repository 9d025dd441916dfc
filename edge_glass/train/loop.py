"""The one training loop, on Hugging Face Accelerate: one CPU process, torchrun / accelerate launch
(DDP over gloo or NCCL), DeepSpeed ZeRO or FSDP (configs/accelerate/*.yaml).

Data are cached frozen features, so a "data loader" is a seeded permutation per epoch: step s
of a run always sees the same global batch, whatever happened before (resume) and however
many processes share it (each takes its contiguous slice of the global batch). Resuming
restores model, optimizer, scheduler and RNG states from the last atomic checkpoint (Accelerate's
save_state, every rank's shards under ZeRO / FSDP), so a killed-and-resumed run ends with the
same metrics as an uninterrupted one. Under a sharding engine the main process evaluates and saves
a plain replica of the model, refreshed from the gathered full state dict.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..config import config_from_dict, dump_config, load_yaml
from ..data.samples import DataReport
from ..errors import ConfigError, EdgeGlassError
from ..runs import RunDir, slug
from ..tasks import Task, task_class, task_for
from .checkpoint import Checkpointer, agree, latest_checkpoint, sharded
from .lock import RunLock
from .logging import MetricsLogger, check_trackers, flatten, scalars, unflatten


def make_accelerator(tcfg, find_unused_parameters: bool = False, run_dir: str | Path | None = None):
    """The Accelerator of a run: its engine comes from the launch (accelerate launch --config_file
    configs/accelerate/NAME.yaml, torchrun, or none); trackers (``tcfg.log_with``) log into
    ``run_dir``, without which only metrics.jsonl is written."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise EdgeGlassError("train.device: cuda, but no CUDA GPU is available (torch.cuda.is_available() is False); use auto or cpu")
    cpu = tcfg.device == "cpu" or (tcfg.device == "auto" and not torch.cuda.is_available())
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("num_processes", 1) == 1 and (shared.get("_mixed_precision") != tcfg.mixed_precision or shared.get("_cpu", cpu) != cpu):
        AcceleratorState._reset_state()  # an earlier run in this process (ablation variant, notebook) set other options
    log_with = list(tcfg.log_with) if run_dir is not None else []
    check_trackers(log_with)
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tensorboard")) if run_dir is not None else None
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    try:
        acc = Accelerator(cpu=cpu, mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.grad_accum,
                          kwargs_handlers=[ddp], log_with=log_with or None, project_config=project)
    except ImportError as exc:  # e.g. a DeepSpeed launch config without deepspeed installed
        raise EdgeGlassError(f"the launch needs a package that is missing: {exc}") from None
    acc.gradient_accumulation_steps = tcfg.grad_accum  # train.grad_accum, not a launch config's ACCELERATE_GRADIENT_ACCUMULATION_STEPS
    check_engine(acc)
    return acc


ENGINE_ENV = {"DEEPSPEED": "ACCELERATE_USE_DEEPSPEED", "FSDP": "ACCELERATE_USE_FSDP"}


def check_engine(acc) -> None:
    """A launch that asks for DeepSpeed or FSDP gets it, or fails here: on CPU processes
    Accelerate sets up plain DDP (MULTI_CPU) instead, silently."""
    import accelerate

    for engine, env in ENGINE_ENV.items():
        if os.environ.get(env, "false").lower() == "true" and acc.distributed_type.value != engine:
            raise EdgeGlassError(
                f"the launch asks for {engine} ({env}=true), but Accelerate {accelerate.__version__} set up {acc.distributed_type.value} "
                f"on {acc.device.type}: it runs {engine} only across accelerators (CUDA GPUs), never on CPU processes; "
                "on CPUs launch with configs/accelerate/2cpu.yaml (DDP over gloo)")


def configure_engine(acc, core: torch.nn.Module, tcfg) -> None:
    """What DeepSpeed and FSDP need to know before ``prepare``."""
    if acc.distributed_type.value == "DEEPSPEED":  # no prepared DataLoader tells it the micro batch: the config does
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = tcfg.batch_size // acc.num_processes
        ds["gradient_accumulation_steps"] = tcfg.grad_accum
        ds["train_batch_size"] = tcfg.batch_size * tcfg.grad_accum
        ds["gradient_clipping"] = tcfg.grad_clip or 0.0
    if acc.distributed_type.value == "FSDP":
        scalar = scalar_parameters(core)
        if scalar:
            raise EdgeGlassError(f"FSDP cannot shard this model: torch's fully_shard and FullyShardedDataParallel refuse 0-dim parameters "
                                 f"({', '.join(scalar[:4])}{', ...' if len(scalar) > 4 else ''}); train it with DDP "
                                 "(configs/accelerate/2gpu_ddp.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/2gpu_zero2.yaml)")


def scalar_parameters(module: torch.nn.Module) -> list[str]:
    """Names of 0-dim parameters (temperatures, gates), which FSDP (1 and 2) refuses to shard."""
    return [n for n, p in module.named_parameters() if p.ndim == 0]


def full_model(acc, model, core: torch.nn.Module, replica: torch.nn.Module | None) -> torch.nn.Module | None:
    """The model the main process evaluates and saves: the core itself, or under DeepSpeed / FSDP
    the replica refreshed from the gathered full state dict (every process must call this)."""
    if replica is None and not sharded(acc):
        return core
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    replica.load_state_dict(state)
    return replica


def process_memory(device: torch.device) -> dict[str, float]:
    """This process's resident memory and, on CUDA, the most the allocator ever held (MiB)."""
    import psutil

    out = {"cpu_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def epoch_order(data: Any, epoch: int, seed: int, mode: str, rates: torch.Tensor | None = None) -> torch.Tensor:
    """Sample indices of one epoch: a permutation seeded by (seed, epoch). ``rates`` (N,) scale
    how often each sample comes up per epoch (see resample)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if mode == "one_per_group":
        groups = data.group_ids()
        pick = torch.rand(len(groups), generator=g)
        best: dict[int, tuple[float, int]] = {}
        for i, (grp, r) in enumerate(zip(groups.tolist(), pick.tolist())):
            if grp not in best or r < best[grp][0]:
                best[grp] = (r, i)
        idx = torch.tensor(sorted(i for _, i in best.values()))
    else:
        idx = torch.arange(len(data))
    if rates is not None:
        idx = resample(idx, rates[idx], g)
    return idx[torch.randperm(len(idx), generator=g)]


def resample(idx: torch.Tensor, rates: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each set of samples sharing a rate r (a dataset's ``data.weights``) appears floor(r)
    times, plus a fresh seeded subset of round(frac(r) * size): a fixed epoch length."""
    parts = []
    for r in torch.unique(rates).tolist():
        members = idx[rates == r]
        extra = round((r - int(r)) * len(members))
        parts += [members] * int(r) + [members[torch.randperm(len(members), generator=g)[:extra]]]
    return torch.cat(parts)


def lr_schedule(optimizer, tcfg, total_steps: int):
    from transformers import get_scheduler

    warmup = int(tcfg.warmup) if tcfg.warmup >= 1 else round(tcfg.warmup * total_steps)
    name = "cosine" if tcfg.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _resolved_config_text(path: Path) -> str | None:
    """A run's config.yaml as this version resolves it (keys added since, at their defaults, are no
    change), or None when it no longer validates."""
    try:
        return dump_config(config_from_dict(load_yaml(path), str(path)))
    except ConfigError:
        return None


def _prepare_run_dir(run: RunDir, cfg, resume: bool) -> None:
    has_ckpt = (run.path / "checkpoints").is_dir() and any((run.path / "checkpoints").glob("step-*"))
    if run.file("config.yaml").exists():
        if not resume:
            raise EdgeGlassError(f"{run.path} already holds a run; pass --resume to continue it or --out another directory")
        saved, now = run.file("config.yaml").read_text(), dump_config(cfg)
        if saved != now and (old := _resolved_config_text(run.file("config.yaml")) or saved) != now:
            import difflib

            diff = "\n".join(difflib.unified_diff(old.splitlines(), now.splitlines(), "saved", "now", lineterm="", n=0))
            raise EdgeGlassError(f"{run.path}: cannot resume with a different config:\n{diff}")
    elif resume and has_ckpt:
        raise EdgeGlassError(f"{run.path}: checkpoints without config.yaml; not resuming into an unknown run")
    run.write_config(cfg)


def train(cfg, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train an experiment (any task) into ``out_dir``; returns the test-split metrics."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run = RunDir(out_dir)
    acc = make_accelerator(cfg.train, task_class(cfg.task).find_unused_parameters(cfg), run.path)
    task: Task = task_for(cfg, acc.device)
    world, main = acc.num_processes, acc.is_main_process
    tcfg = cfg.train
    if tcfg.batch_size % world:
        raise EdgeGlassError(f"train.batch_size {tcfg.batch_size} must be divisible by the number of processes ({world})")
    lock = RunLock(run.path) if main else None
    try:
        if main:
            lock.acquire()
            _prepare_run_dir(run, cfg, resume)
        acc.wait_for_everyone()
        return _train(cfg, task, acc, run, resume, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, task: Task, acc, run: RunDir, resume: bool, progress: bool) -> dict[str, Any]:
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    tcfg = cfg.train
    from accelerate.utils import set_seed

    t_start = time.time()
    report = DataReport()
    with acc.main_process_first():  # the main process fills the feature cache, the others read it
        splits = task.load(report, progress=progress and main)
    if main:
        report.write(run.file("data_report.json"))
        for name, record in task.records.items():
            run.write_json(name, record)
        print(report.summary() + f"; train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])} samples")
    t_data = time.time() - t_start

    train_data = splits["train"]
    set_seed(cfg.seed)  # after data: loading a backbone (cache miss or not) must not change the init
    core = task.build()
    optimizer = task.optimizer(core)
    per_step = tcfg.batch_size * tcfg.grad_accum
    mode, rates = task.sampling(train_data)
    steps_per_epoch = len(epoch_order(train_data, 0, cfg.seed, mode, rates)) // per_step
    if steps_per_epoch == 0:
        raise EdgeGlassError(f"train.batch_size x grad_accum = {per_step} exceeds the {len(train_data)} training samples")
    total_steps = tcfg.epochs * steps_per_epoch
    # not prepared: Accelerate would step it once per process per step; it follows the global step
    scheduler = lr_schedule(optimizer, tcfg, total_steps)
    configure_engine(acc, core, tcfg)
    replica = copy.deepcopy(core).to(acc.device) if sharded(acc) and main else None
    model, optimizer = acc.prepare(core, optimizer)
    ckpt = Checkpointer(run.path, tcfg.keep_checkpoints, acc, core, scheduler, task.checkpoint_state)

    start, running, since_log, best, window = 0, 0.0, 0, (float("-inf"), 0), {}  # best = (validation score, step)
    if resume and (latest := latest_checkpoint(run.path)) is not None:
        state = ckpt.load(latest)
        start, running, since_log = state["step"], state["running_loss"], state["steps_since_log"]
        best, window = (state["best_score"], state["best_step"]), state.get("running_extra", {})
        if main:
            print(f"resuming from {latest} (step {start}/{total_steps})")
    try:  # trackers start on the main process only: a failure there must stop every process
        logger, failed = MetricsLogger(run.path, acc, tcfg.project or cfg.name.split("/")[0], cfg.model_dump(mode="json", exclude={"variants"}),
                                       resume_step=start if resume else None), None
    except EdgeGlassError as exc:
        failed = exc
    agree(acc, failed)
    local = tcfg.batch_size // world
    eval_every = tcfg.eval_every or steps_per_epoch
    val_limit = getattr(cfg.eval, "val_limit", None)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    order, order_epoch = None, -1
    t_steps = t_loop = time.time()
    model.train()
    for step in range(start, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(train_data, epoch, cfg.seed, mode, rates), epoch
        step_loss = 0.0
        for micro in range(tcfg.grad_accum):
            first = (in_epoch * tcfg.grad_accum + micro) * tcfg.batch_size
            idx = order[first + rank * local : first + (rank + 1) * local]
            with acc.accumulate(model), acc.autocast():  # gradients sync (DeepSpeed steps) on the last micro-batch
                loss, extra = task.loss(model, core, train_data.batch(idx), step)
                acc.backward(loss)  # divided by grad_accum (Accelerate; DeepSpeed itself)
            step_loss += loss.item() / tcfg.grad_accum
            for k, v in scalars(flatten("", extra)).items():  # the task's extra numbers (the main process's): means over the logged micro-batches
                window[k] = [window.get(k, [0.0, 0])[0] + v, window.get(k, [0.0, 0])[1] + 1]
        if world > 1:  # the mean over processes (a per-process loss, e.g. the decoders', differs between them)
            step_loss = acc.reduce(torch.tensor(step_loss, dtype=torch.float64, device=acc.device), reduction="mean").item()
        running += step_loss
        since_log += 1
        grad_norm = acc.clip_grad_norm_(model.parameters(), tcfg.grad_clip) if tcfg.grad_clip else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logged = task.after_step(core)
        done = step + 1
        bar.update(1)
        if done % tcfg.log_every == 0 or done == total_steps:
            n, elapsed = since_log, time.time() - t_steps
            values = {"loss": running / n, "lr": scheduler.get_last_lr()[0], "epoch": epoch, **logged,
                      **unflatten({k: total / count for k, (total, count) in window.items()}),
                      "sec_per_step": elapsed / n, "samples_per_sec": n * per_step / elapsed, "memory": process_memory(acc.device)}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            logger.log(done, "train", values)
            bar.set_postfix(loss=f"{running / n:.4f}")
            running, since_log, window, t_steps = 0.0, 0, {}, time.time()
        if done % eval_every == 0 or done == total_steps:
            if len(splits["val"]):
                view = full_model(acc, model, core, replica)
                if main:
                    val = task.evaluate(view, splits["val"], val_limit)
                    val.pop("predictions", None)
                    score = task.score(val)
                    if score > best[0]:
                        best = (score, done)
                        run.save_weights(task.state_to_save(view), "best.safetensors")
                    logger.log(done, "val", {**val, "score": score})
            acc.wait_for_everyone()
        if done % tcfg.checkpoint_every == 0 or done == total_steps:
            ckpt.save(done, {"epoch": epoch, "batch_in_epoch": in_epoch + 1, "total_steps": total_steps, "running_loss": running,
                             "steps_since_log": since_log, "running_extra": window, "best_score": best[0], "best_step": best[1]})
    bar.close()
    t_train = time.time() - t_loop

    result: dict[str, Any] = {}
    view = full_model(acc, model, core, replica)
    if main:
        if tcfg.select == "best" and best[1]:
            view.load_state_dict(run.load_weights("best.safetensors"), strict=False)
            print(f"selected the weights of step {best[1]} (best validation score {best[0]:.2f})")
        run.save_weights(task.state_to_save(view))
        task.save_files(run)
        for name, data in splits.items():
            held_out = name == "test" or name.startswith("eval:")
            if not held_out or not len(data):
                continue
            out = task.evaluate(view, data)
            predictions = out.pop("predictions", None)
            stem = "eval" if name == "test" else f"eval_{slug(name[5:])}"
            run.write_json(f"{stem}.json", out)
            if predictions is not None:
                run.write_json(f"{stem}_predictions.json", predictions)
            print(task.table({**out, "predictions": predictions or []}, f"test split of {', '.join(cfg.data.train)}" if name == "test" else f"held-out dataset {name[5:]}"))
            if name == "test":
                result = out
        summary = {"steps": total_steps, "steps_per_epoch": steps_per_epoch, "processes": world,
                   "engine": acc.distributed_type.value, "mixed_precision": acc.mixed_precision,
                   "selected_step": best[1] if tcfg.select == "best" and best[1] else total_steps,
                   "data_seconds": round(t_data, 2), "train_seconds": round(t_train, 2),
                   "total_seconds": round(time.time() - t_start, 2)}
        run.write_json("summary.json", summary)
        logger.log(total_steps, "test", result)
    logger.close()
    acc.wait_for_everyone()
    return result
