"""Continual learning on split-task streams: Continuum Memory System vs its control, and DMGD vs
AdamW vs SGD-momentum.

    OMP_NUM_THREADS=1 python benchmarks/nested/continual.py --json runs/bench/nested/continual.json
    OMP_NUM_THREADS=1 python benchmarks/nested/continual.py --quick

Streams (5 two-class tasks each, classes {0,1}, {2,3}, ..., {8,9}, trained one after the other):
  digits  scikit-learn load_digits (8x8 images, 64 pixels / 16), a fixed stratified 70/30 split;
  fsdd    Free Spoken Digit Dataset under edge_glass.paths.data_root() / "fsdd" (official split:
          takes 0-4 test, 5-49 train), each clip featurised as the mean and std over time of its
          32-band log-mel spectrogram (8 kHz, 32 ms Hann windows, 16 ms hop): 64 features,
          standardised with the train set's mean / std.

Protocol: one shared 10-way head trained with the full 10-way cross-entropy on the current task only
(no replay), ``--steps`` optimizer steps per task, batch ``--batch`` sampled with replacement.
After each task every task's test set is scored two ways: task-incremental (argmax over that
task's two classes) and class-incremental (argmax over all 10). With R[i, j] the accuracy on task
j after training task i (T = 5 tasks):

    ACC = 1/T sum_j R[T-1, j]              BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])

(the last task's term is 0 by definition and left out of the BWT mean). Mean and sample std over
``--seeds`` (initialisation and batch order; the data split is fixed).

Network (the same for every row): Linear(64, d) -> 3 residual pre-norm MLP blocks (d -> 2d -> d,
edge_glass.nested.ContinuumMemory) -> LayerNorm -> Linear(d, 10), d = 64. Rows:
  MLP / AdamW       one AdamW, lr 1e-3, every parameter every step
  MLP / SGD-m       one SGD, lr 0.01, momentum 0.9
  MLP / DMGD-dot    one DMGD, MLP memory (hidden 4), dot inner loss, lr 0.01, momentum 0.9
  MLP / DMGD-l2     one DMGD, MLP memory (hidden 4), l2 inner loss, EMA vector memory
                    (momentum 1, inner_lr 0.1), lr 0.1
                    (the three share the effective step lr / (1 - decay) = 0.1 along a steady gradient)
  CMS / AdamW       CMSOptimizer: blocks with periods 1 / 16 / 256 and lrs 1e-3 / 3e-4 / 1e-4
                    (AdamW each, summed gradients); input projection, final norm and head: period 1, lr 1e-3
  CONTROL / AdamW   the same groups and lrs with every period 1 (no periodic updates)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_glass.nested.cms import CMSConfig, CMSOptimizer, ContinuumMemory, LevelSpec
from edge_glass.nested.dmgd import DMGD
from edge_glass.paths import data_root

TASKS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


# -- data --------------------------------------------------------------------------------------
def digits_stream() -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=0)
    return x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te


def _mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filterbank, (n_mels, n_fft // 2 + 1), from transformers' audio utilities."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                           max_frequency=sr / 2, sampling_rate=sr, mel_scale="htk").T


def log_mel_stats(audio: np.ndarray, filters: np.ndarray, n_fft: int = 256, hop: int = 128) -> np.ndarray:
    """Mean and std over time of log(mel power + 1e-6): (2 * n_mels,)."""
    if len(audio) < n_fft:
        audio = np.pad(audio, (0, n_fft - len(audio)))
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop]
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1)) ** 2
    logmel = np.log(spec @ filters.T + 1e-6)
    return np.concatenate([logmel.mean(0), logmel.std(0)])


def fsdd_stream() -> Split | None:
    from edge_glass.media.audio import load_audio

    folder = data_root() / "fsdd" / "recordings"
    files = sorted(folder.glob("*.wav"))
    if not files:
        return None
    filters = _mel_filters(8000, 256, 32)
    feats, labels, test = [], [], []
    for f in files:
        digit, _speaker, take = f.stem.split("_")
        feats.append(log_mel_stats(load_audio(f, sr=8000).astype(np.float64), filters))
        labels.append(int(digit))
        test.append(int(take) < 5)
    x, y, test = np.stack(feats), np.array(labels), np.array(test)
    mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
    x = ((x - mu) / sd).astype(np.float32)
    return x[~test], y[~test], x[test], y[test]


# -- models and optimizers -----------------------------------------------------------------------
PERIODS = [1, 16, 256]
CMS_LRS = [1e-3, 3e-4, 1e-4]


class Net(nn.Module):
    def __init__(self, d_in: int, d_model: int, cms: CMSConfig):
        super().__init__()
        self.inp = nn.Linear(d_in, d_model)
        self.cms = ContinuumMemory(cms)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.cms(self.inp(x))))

    def outer_params(self) -> list[nn.Parameter]:
        return [*self.inp.parameters(), *self.norm.parameters(), *self.head.parameters()]


def cms_config(d_model: int) -> CMSConfig:
    return CMSConfig(d_model, [LevelSpec(period=p, lr=lr, hidden=2 * d_model, optimizer="adamw", name=f"level{p}")
                               for p, lr in zip(PERIODS, CMS_LRS)])


class _Single:
    """A plain torch optimizer behind the CMSOptimizer interface used by the loop."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> list[int]:
        self.opt.step()
        return [0]


def build(name: str, d_in: int, d_model: int, seed: int) -> tuple[Net, object]:
    torch.manual_seed(seed)
    net = Net(d_in, d_model, cms_config(d_model))
    if name == "MLP / AdamW":
        return net, _Single(torch.optim.AdamW(net.parameters(), lr=1e-3))
    if name == "MLP / SGD-m":
        return net, _Single(torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    if name == "MLP / DMGD-dot":
        return net, _Single(DMGD(net.parameters(), lr=0.01, momentum=0.9, memory="mlp", inner_loss="dot", hidden=4, seed=seed))
    if name == "MLP / DMGD-l2":
        return net, _Single(DMGD(net.parameters(), lr=0.1, momentum=1.0, inner_lr=0.1, memory="mlp", inner_loss="l2",
                                 hidden=4, seed=seed))
    outer = {"params": net.outer_params(), "lr": 1e-3, "period": 1, "optimizer": "adamw", "name": "outer"}
    if name == "CMS / AdamW":
        return net, CMSOptimizer.for_memory(net.cms, [outer])
    if name == "CONTROL / AdamW":
        return net, CMSOptimizer.for_memory(net.cms, [outer], control=True)
    raise ValueError(name)


MODELS = ["MLP / AdamW", "MLP / SGD-m", "MLP / DMGD-dot", "MLP / DMGD-l2", "CMS / AdamW", "CONTROL / AdamW"]


# -- one run -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(net: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per task: (task-incremental accuracy, class-incremental accuracy)."""
    logits = net(x)
    til, cil = [], []
    for a, b in TASKS:
        sel = (y == a) | (y == b)
        lg, yy = logits[sel], y[sel]
        pair = torch.where(lg[:, a] >= lg[:, b], a, b)
        til.append(float((pair == yy).float().mean()))
        cil.append(float((lg.argmax(1) == yy).float().mean()))
    return til, cil


def run_stream(data: Split, model: str, seed: int, steps: int, batch: int, d_model: int) -> dict:
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(a) for a in data)
    y_tr, y_te = y_tr.long(), y_te.long()
    net, opt = build(model, x_tr.shape[1], d_model, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    R_til, R_cil, updates = [], [], {}
    for a, b in TASKS:
        idx = torch.nonzero((y_tr == a) | (y_tr == b)).squeeze(1)
        for _ in range(steps):
            pick = idx[torch.randint(len(idx), (batch,), generator=gen)]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x_tr[pick]), y_tr[pick])
            loss.backward()
            for i in opt.step():
                updates[i] = updates.get(i, 0) + 1
        til, cil = evaluate(net, x_te, y_te)
        R_til.append(til)
        R_cil.append(cil)
    return {"R_task_il": R_til, "R_class_il": R_cil, **metrics(R_til, "task_il"), **metrics(R_cil, "class_il"),
            "level_updates": [updates.get(i, 0) for i in range(max(updates) + 1)]}


def metrics(R: list[list[float]], tag: str) -> dict[str, float]:
    T = len(R)
    acc = sum(R[-1]) / T
    bwt = sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
    just = sum(R[j][j] for j in range(T)) / T
    return {f"acc_{tag}": acc, f"bwt_{tag}": bwt, f"just_after_{tag}": just}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


KEYS = ["acc_task_il", "bwt_task_il", "acc_class_il", "bwt_class_il", "just_after_class_il"]


def table(summary: dict[str, dict[str, tuple[float, float]]], stream: str) -> str:
    head = ("| stream | model / optimizer | ACC task-IL | BWT task-IL | ACC class-IL | BWT class-IL | "
            "just-after class-IL | s / run |")
    lines = [head, "|" + "---|" * 8]
    for model, s in summary.items():
        cells = [f"{100 * s[k][0]:.1f} ± {100 * s[k][1]:.1f}" for k in KEYS]
        lines.append(f"| {stream} | {model} | " + " | ".join(cells) + f" | {s['seconds'][0]:.1f} |")
    return "\n".join(lines)


def verdict(summary: dict[str, dict[str, tuple[float, float]]], stream: str, n_seeds: int) -> str:
    """CMS vs CONTROL: 'beats' only where the mean difference exceeds the larger of the two stds."""
    if n_seeds < 2:
        return f"{stream}: one seed only, no std: no claim about CMS vs CONTROL."
    cms, ctl = summary["CMS / AdamW"], summary["CONTROL / AdamW"]
    parts = []
    for key, label in [("bwt_task_il", "BWT (task-IL)"), ("acc_task_il", "ACC (task-IL)"),
                       ("bwt_class_il", "BWT (class-IL)"), ("acc_class_il", "ACC (class-IL)")]:
        diff = cms[key][0] - ctl[key][0]
        bar = max(cms[key][1], ctl[key][1])
        if diff > bar:
            word = "beats"
        elif diff < -bar:
            word = "is worse than"
        else:
            word = "does not differ by more than one std from"
        parts.append(f"{label}: CMS {word} CONTROL ({100 * diff:+.1f} points, one std = {100 * bar:.1f})")
    return f"{stream}: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per task")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--streams", nargs="+", default=["digits", "fsdd"], choices=["digits", "fsdd"])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 30 steps per task")
    ap.add_argument("--json", type=Path, help="write every number (per seed R matrices, summaries) here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 30
    torch.set_num_threads(args.threads)
    loaders: dict[str, Callable[[], Split | None]] = {"digits": digits_stream, "fsdd": fsdd_stream}
    record = {"config": {"seeds": args.seeds, "steps_per_task": args.steps, "batch": args.batch, "d_model": args.d_model,
                         "tasks": TASKS, "periods": PERIODS, "cms_lrs": CMS_LRS, "threads": args.threads,
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "streams": {}}
    t_all = time.perf_counter()
    outputs = []
    for stream in args.streams:
        t0 = time.perf_counter()
        data = loaders[stream]()
        if data is None:
            print(f"{stream}: data not found under {data_root()} (set EDGE_GLASS_DATA); skipped", file=sys.stderr)
            continue
        prep = time.perf_counter() - t0
        per_model, summary = {}, {}
        for model in args.models:
            runs = {}
            for seed in args.seeds:
                t1 = time.perf_counter()
                runs[seed] = run_stream(data, model, seed, args.steps, args.batch, args.d_model)
                runs[seed]["seconds"] = time.perf_counter() - t1
            per_model[model] = runs
            summary[model] = {k: mean_std([r[k] for r in runs.values()])
                              for k in [*KEYS, "just_after_task_il", "seconds"]}
            print(f"  {stream:6s} {model:16s} " + "  ".join(f"{k} {summary[model][k][0]:.3f}±{summary[model][k][1]:.3f}"
                                                           for k in KEYS), file=sys.stderr, flush=True)
        record["streams"][stream] = {"n_train": int(len(data[1])), "n_test": int(len(data[3])), "prepare_seconds": prep,
                                     "runs": {m: {str(s): r for s, r in rs.items()} for m, rs in per_model.items()},
                                     "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()}
                                                 for m, s in summary.items()}}
        outputs.append((stream, summary, len(data[1]), len(data[3])))
    print(f"\nSplit-task continual learning, 5 tasks x {args.steps} steps (batch {args.batch}), seeds {args.seeds}; "
          "percent, mean ± std over seeds\n")
    for i, (stream, summary, n_tr, n_te) in enumerate(outputs):
        print(table(summary, f"{stream} ({n_tr}/{n_te})") if i == 0 else "\n".join(table(summary, f"{stream} ({n_tr}/{n_te})").splitlines()[2:]))
    print()
    for stream, summary, *_ in outputs:
        if "CMS / AdamW" in summary and "CONTROL / AdamW" in summary:
            print(verdict(summary, stream, len(args.seeds)))
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f} s")
    record["total_seconds"] = total
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
