"""The one training loop, on Hugging Face Accelerate (1 CPU process, torchrun/gloo, or GPUs).

Data are cached frozen features, so a "data loader" is a seeded permutation per epoch: step s
of a run always sees the same global batch, whatever happened before (resume) and however
many processes share it (each takes its contiguous slice of the global batch). Resuming
restores model, optimizer, scheduler and RNG states from the last atomic checkpoint, so a
killed-and-resumed run ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import dump_config
from ..data.samples import DataReport
from ..errors import EdgeGlassError
from ..runs import RunDir, slug
from ..tasks import Task, task_class, task_for
from .checkpoint import Checkpointer
from .lock import RunLock
from .logging import MetricsLogger


def make_accelerator(tcfg, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise EdgeGlassError("train.device: cuda, but no CUDA GPU is available (torch.cuda.is_available() is False); use auto or cpu")
    cpu = tcfg.device == "cpu" or (tcfg.device == "auto" and not torch.cuda.is_available())
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("num_processes", 1) == 1 and (shared.get("_mixed_precision") != tcfg.mixed_precision or shared.get("_cpu", cpu) != cpu):
        AcceleratorState._reset_state()  # an earlier run in this process (ablation variant, notebook) set other options
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(cpu=cpu, mixed_precision=tcfg.mixed_precision, kwargs_handlers=[ddp])


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


def _prepare_run_dir(run: RunDir, cfg, resume: bool) -> None:
    has_ckpt = (run.path / "checkpoints").is_dir() and any((run.path / "checkpoints").glob("step-*"))
    if run.file("config.yaml").exists():
        if not resume:
            raise EdgeGlassError(f"{run.path} already holds a run; pass --resume to continue it or --out another directory")
        old = run.file("config.yaml").read_text()
        if old != dump_config(cfg):
            import difflib

            diff = "\n".join(difflib.unified_diff(old.splitlines(), dump_config(cfg).splitlines(), "saved", "now", lineterm="", n=0))
            raise EdgeGlassError(f"{run.path}: cannot resume with a different config:\n{diff}")
    elif resume and has_ckpt:
        raise EdgeGlassError(f"{run.path}: checkpoints without config.yaml; not resuming into an unknown run")
    run.write_config(cfg)


def train(cfg, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train an experiment (any task) into ``out_dir``; returns the test-split metrics."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    acc = make_accelerator(cfg.train, task_class(cfg.task).find_unused_parameters(cfg))
    task: Task = task_for(cfg, acc.device)
    world, main = acc.num_processes, acc.is_main_process
    tcfg = cfg.train
    if tcfg.batch_size % world:
        raise EdgeGlassError(f"train.batch_size {tcfg.batch_size} must be divisible by the number of processes ({world})")
    run = RunDir(out_dir)
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
    scheduler = lr_schedule(optimizer, tcfg, total_steps)
    model, optimizer = acc.prepare(core, optimizer)
    ckpt = Checkpointer(run.path, tcfg.keep_checkpoints, rank, acc.wait_for_everyone)

    start, running, since_log, best = 0, 0.0, 0, (float("-inf"), 0)  # best = (validation score, step)
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, core, optimizer, scheduler)
        start, running, since_log = state["step"], state["running_loss"], state["steps_since_log"]
        best = (state["best_score"], state["best_step"])
        if main:
            print(f"resuming from {latest} (step {start}/{total_steps})")
    logger = MetricsLogger(run.path, main, resume_step=start if resume else None)
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
        extra: dict[str, float] = {}
        for micro in range(tcfg.grad_accum):
            first = (in_epoch * tcfg.grad_accum + micro) * tcfg.batch_size
            idx = order[first + rank * local : first + (rank + 1) * local]
            sync = nullcontext() if micro == tcfg.grad_accum - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                loss, extra = task.loss(model, core, train_data.batch(idx), step)
                acc.backward(loss / tcfg.grad_accum)
            running += loss.item() / tcfg.grad_accum
        since_log += 1
        grad_norm = acc.clip_grad_norm_(model.parameters(), tcfg.grad_clip) if tcfg.grad_clip else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logged = task.after_step(core)
        done = step + 1
        bar.update(1)
        if done % tcfg.log_every == 0 or done == total_steps:
            n = since_log
            values = {"loss": running / n, "lr": scheduler.get_last_lr()[0], "epoch": epoch, **logged, **extra,
                      "sec_per_step": (time.time() - t_steps) / n}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            logger.log(done, "train", values)
            bar.set_postfix(loss=f"{running / n:.4f}")
            running, since_log, t_steps = 0.0, 0, time.time()
        if done % eval_every == 0 or done == total_steps:
            if main and len(splits["val"]):
                val = task.evaluate(core, splits["val"], val_limit)
                val.pop("predictions", None)
                score = task.score(val)
                if score > best[0]:
                    best = (score, done)
                    run.save_weights(task.state_to_save(core), "best.safetensors")
                logger.log(done, "val", {**val, "score": score})
            acc.wait_for_everyone()
        if done % tcfg.checkpoint_every == 0 or done == total_steps:
            ckpt.save(done, task.state_to_save(core), optimizer, scheduler, {"epoch": epoch, "batch_in_epoch": in_epoch + 1, "total_steps": total_steps,
                                                         "running_loss": running, "steps_since_log": since_log,
                                                         "best_score": best[0], "best_step": best[1]})
    bar.close()
    t_train = time.time() - t_loop

    result: dict[str, Any] = {}
    if main:
        if tcfg.select == "best" and best[1]:
            core.load_state_dict(run.load_weights("best.safetensors"), strict=False)
            print(f"selected the weights of step {best[1]} (best validation score {best[0]:.2f})")
        run.save_weights(task.state_to_save(core))
        task.save_files(run)
        for name, data in splits.items():
            held_out = name == "test" or name.startswith("eval:")
            if not held_out or not len(data):
                continue
            out = task.evaluate(core, data)
            predictions = out.pop("predictions", None)
            stem = "eval" if name == "test" else f"eval_{slug(name[5:])}"
            run.write_json(f"{stem}.json", out)
            if predictions is not None:
                run.write_json(f"{stem}_predictions.json", predictions)
            print(task.table({**out, "predictions": predictions or []}, f"test split of {', '.join(cfg.data.train)}" if name == "test" else f"held-out dataset {name[5:]}"))
            if name == "test":
                result = out
        summary = {"steps": total_steps, "steps_per_epoch": steps_per_epoch, "processes": world,
                   "selected_step": best[1] if tcfg.select == "best" and best[1] else total_steps,
                   "data_seconds": round(t_data, 2), "train_seconds": round(t_train, 2),
                   "total_seconds": round(time.time() - t_start, 2)}
        run.write_json("summary.json", summary)
        logger.log(total_steps, "test", result)
    logger.close()
    acc.wait_for_everyone()
    return result
