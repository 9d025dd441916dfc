"""The one training loop, on Hugging Face Accelerate (1 CPU process, torchrun/gloo, or GPUs).

Data are cached frozen features, so a "data loader" is a seeded permutation per epoch: step s
of a run always sees the same global batch, whatever happened before (resume) and however
many processes share it (each takes its contiguous slice of the global batch). Resuming
restores model, optimizer, scheduler and RNG states from the last atomic checkpoint, so a
killed-and-resumed run ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import dump_config
from ..data.pipeline import Batch, PairedData
from ..data.samples import DataReport
from ..encoders import build_encoders
from ..errors import EdgeGlassError
from ..eval.retrieval import evaluate_retrieval, format_table
from ..losses import gather, matryoshka_info_nce
from ..models.alignment import AlignmentModel, pair_name
from ..runs import RunDir, slug
from .checkpoint import Checkpointer
from .data import load_splits
from .logging import MetricsLogger


def make_accelerator(tcfg, modalities: int):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = tcfg.device == "cpu" or (tcfg.device == "auto" and not torch.cuda.is_available())
    # with 3+ modalities a batch may lack one, leaving its head without gradients this step
    ddp = DistributedDataParallelKwargs(find_unused_parameters=modalities > 2)
    return Accelerator(cpu=cpu, mixed_precision=tcfg.mixed_precision, kwargs_handlers=[ddp])


def epoch_order(data: PairedData, epoch: int, seed: int, mode: str) -> torch.Tensor:
    """Sample indices of one epoch: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if mode == "one_per_group":
        groups = data.group_ids()
        pick = torch.rand(len(groups), generator=g)
        best: dict[int, tuple[float, int]] = {}
        for i, (grp, r) in enumerate(zip(groups.tolist(), pick.tolist())):
            if grp not in best or r < best[grp][0]:
                best[grp] = (r, i)
        idx = torch.tensor(sorted(i for _, i in best.values()))
        return idx[torch.randperm(len(idx), generator=g)]
    return torch.randperm(len(data), generator=g)


def dim_weights(cfg, step: int) -> dict[int, float]:
    """MRL weights of this step: all dims, or one dim drawn (same on every process)."""
    dims = cfg.model.dims
    w = cfg.loss.mrl.weights or [1.0] * len(dims)
    if not cfg.loss.mrl.sample_one_dim:
        return dict(zip(dims, w))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    pick = int(torch.multinomial(torch.tensor(w, dtype=torch.float), 1, generator=g))
    return {d: (1.0 if i == pick else 0.0) for i, d in enumerate(dims)}


def contrastive_loss(model, core: AlignmentModel, batch: Batch, weights: dict[int, float], pair_weights: dict[str, float]) -> torch.Tensor:
    """Sum over modality pairs of the Matryoshka InfoNCE, on embeddings gathered from all processes."""
    emb, scales = model(batch.features)
    n = next(iter(batch.present.values())).shape[0]
    full: dict[str, dict[int, torch.Tensor]] = {}
    present: dict[str, torch.Tensor] = {}
    keys: dict[str, torch.Tensor] = {}
    for m in core.modalities:  # every process gathers every modality, present or not
        has = batch.present.get(m, torch.zeros(n, dtype=torch.bool))
        present[m] = gather(has.to(torch.uint8)).bool()
        keys[m] = gather(batch.keys.get(m, torch.full((n,), -1, dtype=torch.long)))
        full[m] = {}
        for d in core.dims:
            z = torch.zeros(n, d, device=has.device)
            if m in emb:
                z = z.index_put((has.nonzero().squeeze(1),), emb[m][d])
            full[m][d] = gather(z)
    total = torch.zeros((), device=next(core.parameters()).device)
    for a, b in core.pairs:
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue
        ea = {d: t[both] for d, t in full[a].items()}
        eb = {d: t[both] for d, t in full[b].items()}
        loss = matryoshka_info_nce(ea, eb, scales[pair_name(a, b)], keys[a][both], keys[b][both], weights)
        total = total + pair_weights.get(f"{a}-{b}", 1.0) * loss
    return total


def lr_schedule(optimizer, tcfg, total_steps: int):
    from transformers import get_scheduler

    warmup = int(tcfg.warmup) if tcfg.warmup >= 1 else round(tcfg.warmup * total_steps)
    name = "cosine" if tcfg.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith(("latents", "query")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    """Train an alignment experiment into ``out_dir``; returns the test-split metrics."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    acc = make_accelerator(cfg.train, len(cfg.encoders))
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    tcfg = cfg.train
    if tcfg.batch_size % world:
        raise EdgeGlassError(f"train.batch_size {tcfg.batch_size} must be divisible by the number of processes ({world})")
    run = RunDir(out_dir)
    if main:
        _prepare_run_dir(run, cfg, resume)
    acc.wait_for_everyone()
    from accelerate.utils import set_seed

    t_start = time.time()

    encoders = build_encoders(cfg.encoders)
    report = DataReport()
    with acc.main_process_first():  # the main process fills the feature cache, the others read it
        splits, split_record = load_splits(cfg, encoders, report, progress=progress and main)
    if main:
        report.write(run.file("data_report.json"))
        run.write_json("split.json", split_record)
        run.write_json("encoders.json", {m: e.fingerprint() for m, e in encoders.items()})
        print(report.summary() + f"; train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])} pairs")
    t_data = time.time() - t_start

    train_data = splits["train"]
    set_seed(cfg.seed)  # after data: loading a backbone (cache miss or not) must not change the heads' init
    core = AlignmentModel(cfg.model, cfg.loss, {m: e.token_dim for m, e in encoders.items()})
    optimizer = torch.optim.AdamW(param_groups(core, tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas)
    per_step = tcfg.batch_size * tcfg.grad_accum
    steps_per_epoch = len(epoch_order(train_data, 0, cfg.seed, cfg.data.pairs_per_epoch)) // per_step
    if steps_per_epoch == 0:
        raise EdgeGlassError(f"train.batch_size x grad_accum = {per_step} exceeds the {len(train_data)} training pairs")
    total_steps = tcfg.epochs * steps_per_epoch
    scheduler = lr_schedule(optimizer, tcfg, total_steps)
    model, optimizer = acc.prepare(core, optimizer)
    ckpt = Checkpointer(run.path, tcfg.keep_checkpoints, rank, acc.wait_for_everyone)

    start, running, since_log = 0, 0.0, 0
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, core, optimizer, scheduler)
        start, running, since_log = state["step"], state["running_loss"], state["steps_since_log"]
        if main:
            print(f"resuming from {latest} (step {start}/{total_steps})")
    logger = MetricsLogger(run.path, main, resume_step=start if resume else None)
    local = tcfg.batch_size // world
    eval_every = tcfg.eval_every or steps_per_epoch
    device = acc.device

    def to_device(batch: Batch) -> Batch:
        if device.type == "cpu":
            return batch
        return Batch({k: v.to(device) for k, v in batch.present.items()}, {k: v.to(device) for k, v in batch.features.items()}, {k: v.to(device) for k, v in batch.keys.items()})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    order, order_epoch = None, -1
    t_steps = time.time()
    model.train()
    for step in range(start, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(train_data, epoch, cfg.seed, cfg.data.pairs_per_epoch), epoch
        weights = dim_weights(cfg, step)
        for micro in range(tcfg.grad_accum):
            first = (in_epoch * tcfg.grad_accum + micro) * tcfg.batch_size
            idx = order[first + rank * local : first + (rank + 1) * local]
            sync = nullcontext() if micro == tcfg.grad_accum - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                loss = contrastive_loss(model, core, to_device(train_data.batch(idx)), weights, cfg.loss.pair_weights)
                acc.backward(loss / tcfg.grad_accum)
            running += loss.item() / tcfg.grad_accum
        since_log += 1
        grad_norm = acc.clip_grad_norm_(model.parameters(), tcfg.grad_clip) if tcfg.grad_clip else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        core.clamp_scales()
        done = step + 1
        bar.update(1)
        if done % tcfg.log_every == 0 or done == total_steps:
            n = since_log
            temps = {k: round(1.0 / float(v.detach().exp()), 5) for k, v in core.logit_scales.items()}
            values = {"loss": running / n, "lr": scheduler.get_last_lr()[0], "epoch": epoch, "temperature": temps,
                      "sec_per_step": (time.time() - t_steps) / n}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            logger.log(done, "train", values)
            bar.set_postfix(loss=f"{running / n:.4f}")
            running, since_log, t_steps = 0.0, 0, time.time()
        if done % eval_every == 0 or done == total_steps:
            if main and len(splits["val"]):
                logger.log(done, "val", evaluate_retrieval(core, splits["val"], cfg.eval.ks, cfg.eval.batch_size))
            acc.wait_for_everyone()
        if done % tcfg.checkpoint_every == 0 or done == total_steps:
            ckpt.save(done, core, optimizer, scheduler, {"epoch": epoch, "batch_in_epoch": in_epoch + 1, "total_steps": total_steps,
                                                         "running_loss": running, "steps_since_log": since_log})
    bar.close()

    result: dict[str, Any] = {}
    if main:
        run.save_weights(core.state_dict())
        result = evaluate_retrieval(core, splits["test"], cfg.eval.ks, cfg.eval.batch_size) if len(splits["test"]) else {}
        run.write_json("eval.json", result)
        print(format_table(result, f"test split of {', '.join(cfg.data.train)}"))
        for name, data in splits.items():
            if name.startswith("eval:"):
                extra = evaluate_retrieval(core, data, cfg.eval.ks, cfg.eval.batch_size)
                run.write_json(f"eval_{slug(name[5:])}.json", extra)
                print(format_table(extra, f"held-out dataset {name[5:]}"))
        summary = {"steps": total_steps, "steps_per_epoch": steps_per_epoch, "processes": world,
                   "data_seconds": round(t_data, 2), "total_seconds": round(time.time() - t_start, 2)}
        run.write_json("summary.json", summary)
        logger.log(total_steps, "test", result)
    logger.close()
    acc.wait_for_everyone()
    return result
