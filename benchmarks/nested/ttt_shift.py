"""Test-time adaptation under distribution shift on scikit-learn digits: frozen vs TENT vs the
TTT-Linear adapter (edge_glass.nested.ttt.TTTAdapter).

    OMP_NUM_THREADS=1 python benchmarks/nested/ttt_shift.py --json runs/bench/nested/ttt_shift.json
    OMP_NUM_THREADS=1 python benchmarks/nested/ttt_shift.py --quick

Data: load_digits (8x8, pixels / 16 in [0, 1]), one fixed stratified split 60 / 20 / 20 into
train / validation / test. A stream is a sequence of L images (``--stream``) presented one after
the other; every test split is shuffled (per seed) and cut into streams, each under one shift:

  reported (test split)     clean; noise: x + N(0, 0.3^2), clipped to [0, 1]; invert: 1 - x;
                            blur: 3x3 binomial kernel [1 2 1]^T [1 2 1] / 16, zero padding
  selection (validation     clean; saltpepper: 10% of the pixels set to 0 or 1; gamma: x -> x^0.5
  split only)               (a first version selected on translate, one pixel right and down,
                            which every model fails at ~15%: useless for selection; still defined)

Hyperparameters of both adaptive methods are picked on the validation split under the selection
shifts (mean accuracy over clean + saltpepper + translate, seed 0), never on the reported shifts.

Training (every model, the same data): AdamW, ``--steps`` steps, each on ``--train-streams``
streams of L training images sampled without replacement within a stream; each training stream
gets a random intensity change and a random fixed pixel pattern, x -> a x + c + p with
a ~ U[0.6, 1.4], c ~ U[-0.2, 0.2], p ~ N(0, offset^2 I_64) drawn once per stream (``--offset``,
default 0.3; a shift family disjoint from all the ones above, which rewards using a stream's
statistics; the first version trained with offset 0). Network: x (64) -> first layer -> BatchNorm -> ReLU ->
Linear(128, 128) -> BatchNorm -> ReLU -> Linear(128, 10).

Rows:
  frozen   first layer nn.Linear(64, 128); at test BatchNorm uses its running statistics, nothing
           is updated.
  tent     the frozen model, adapted per stream (Wang et al. 2021): BatchNorm normalises with the
           current test batch's statistics, and after predicting each batch of ``tent_batch``
           stream images one Adam step (lr ``tent_lr``) on the mean prediction entropy
           H(p) = -sum_c p_c log p_c updates only the BatchNorm affine parameters (gamma, beta);
           restored to the trained values at the start of every stream.
  ttt-noupdate  the ttt network with eta = 0 (its fast weight stays W_0 = 0: no adapter), an
           ablation that isolates the online learning from the training differences.
  ttt      first layer TTTAdapter.wrap(nn.Linear(64, 128), rank, eta, mini_batch_size, bias=True),
           trained end to end through the inner updates over the training streams, outer loss
           CE + lambda * mean online inner loss (the joint self-supervised task of Sun et al. 2020);
           at test the fast weight learns online along each stream (write then read: the
           prediction for image t uses W_t, which has seen images 1..t of its stream), state reset
           (W = W_0 = 0) at the start of every stream; BatchNorm uses running statistics.

Accuracy is over every test image; mean and sample std over ``--seeds`` (initialisation, batch
order, stream order, noise draws; the split is fixed). Test streams run as one padded batch with a
padding mask (TTTAdapter ``mask=``): each stream is still adapted on its own.

``--dataset fsdd``: spoken digits from a speaker never heard in training (FSDD under
edge_glass.paths.data_root() / "fsdd"; skipped with a message when absent).

    OMP_NUM_THREADS=1 python benchmarks/nested/ttt_shift.py --dataset fsdd --seeds 2 --json runs/bench/nested/ttt_shift_fsdd.json

  features  each clip's 64-dim mean / std log-mel (continual.py's featuriser), standardised with the
            training clips' mean / std (per fold)
  folds     one speaker held out per fold. Training: the other five speakers' takes 10-49; clean
            stream: their takes 0-4; shifted stream: all 500 clips of the held-out speaker (each
            stream = ``--stream`` clips of that speaker, so TTT adapts to one voice)
  training  every training stream is ``--stream`` clips of ONE training speaker (no pixel
            augmentation), so the adapter learns to use a stream's speaker statistics
  selection hyperparameters (the same grids) picked on a validation fold: speaker FSDD_VAL_SPEAKER
            held out, score = mean of its accuracy and the clean validation takes 5-9 of the others;
            that speaker is never a reported test speaker (the other five are, one per fold)
  report    mean ± sample std over folds x ``--seeds``; per held-out speaker in the JSON
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_glass.nested.ttt import TTTAdapter

REPORTED = ["clean", "noise", "invert", "blur"]
SELECTION = ["clean", "saltpepper", "gamma"]


# -- data ----------------------------------------------------------------------------------------
def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    return {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}


def apply_shift(x: torch.Tensor, shift: str, gen: torch.Generator) -> torch.Tensor:
    """x (..., 64) in [0, 1] -> the shifted images (module doc)."""
    if shift == "clean":
        return x
    if shift == "noise":
        return (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
    if shift == "invert":
        return 1.0 - x
    if shift == "blur":
        k1 = torch.tensor([1.0, 2.0, 1.0])
        kern = (k1[:, None] * k1[None, :] / 16.0)[None, None]
        img = x.reshape(-1, 1, 8, 8)
        return F.conv2d(img, kern, padding=1).reshape(x.shape)
    if shift == "saltpepper":
        u = torch.rand(x.shape, generator=gen)
        salt = (torch.rand(x.shape, generator=gen) < 0.5).float()
        return torch.where(u < 0.1, salt, x)
    if shift == "gamma":
        return x.sqrt()
    if shift == "translate":
        img = x.reshape(-1, 8, 8)
        out = torch.zeros_like(img)
        out[:, 1:, 1:] = img[:, :-1, :-1]
        return out.reshape(x.shape)
    raise ValueError(f"unknown shift {shift!r}")


def make_streams(x: np.ndarray, y: np.ndarray, L: int, shift: str,
                 seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Shuffle (per seed), shift, cut into streams of L images (a shorter last stream holds the rest)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(x), generator=gen)
    xs, ys = torch.from_numpy(x)[perm], torch.from_numpy(y).long()[perm]
    xs = apply_shift(xs, shift, gen)
    return list(xs.split(L)), list(ys.split(L))


# -- models --------------------------------------------------------------------------------------
class Net(nn.Module):
    """first -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear; inputs (S, L, 64) streams."""

    def __init__(self, ttt: dict | None, hidden: int = 128):
        super().__init__()
        lin = nn.Linear(64, hidden)
        self.first = TTTAdapter.wrap(lin, **ttt, bias=True) if ttt is not None else lin
        self.bn1, self.bn2 = nn.BatchNorm1d(hidden), nn.BatchNorm1d(hidden)
        self.mid, self.head = nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (S, L, 64) -> (logits (S, L, 10), mean online inner loss (0 without the adapter)).

        mask (S, L), True at real images: streams of different lengths padded into one batch. Padded
        images never reach the adapter's fast weight or BatchNorm's batch statistics; their logits are 0.
        """
        S, L, _ = x.shape
        if isinstance(self.first, TTTAdapter):
            h, state = self.first(x, mask=mask)   # a fresh state per stream: reset at every call
            inner = state.inner_loss
        else:
            h, inner = self.first(x), x.new_zeros(())
        rows = h.reshape(S * L, -1) if mask is None else h[mask]
        rows = F.relu(self.bn1(rows))
        rows = self.head(F.relu(self.bn2(self.mid(rows))))
        if mask is None:
            return rows.reshape(S, L, 10), inner
        return rows.new_zeros(S, L, 10).masked_scatter(mask[..., None].expand(S, L, 10), rows), inner


def train(ttt: dict | None, lam: float, data, args, seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net(ttt)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    x_tr, y_tr = torch.from_numpy(data["train"][0]), torch.from_numpy(data["train"][1]).long()
    gen = torch.Generator().manual_seed(seed)
    S, L = args.train_streams, args.stream
    net.train()
    groups = data.get("train_groups")        # fsdd: one speaker per training stream
    if groups is not None:
        pools = [torch.from_numpy(np.flatnonzero(groups == gname)) for gname in np.unique(groups)]
    for step in range(args.steps):
        if groups is None:
            idx = torch.stack([torch.randperm(len(x_tr), generator=gen)[:L] for _ in range(S)])
        else:
            who = torch.randint(len(pools), (S,), generator=gen)
            idx = torch.stack([pools[w][torch.randperm(len(pools[w]), generator=gen)[:L]] for w in who.tolist()])
        if data.get("augment", True):
            a = 0.6 + 0.8 * torch.rand(S, 1, 1, generator=gen)
            c = -0.2 + 0.4 * torch.rand(S, 1, 1, generator=gen)
            xb = a * x_tr[idx] + c
            if args.offset > 0:  # a per-stream fixed additive pixel pattern
                xb = xb + args.offset * torch.randn(S, 1, 64, generator=gen)
        else:
            xb = x_tr[idx]
        logits, inner = net(xb)
        loss = F.cross_entropy(logits.reshape(-1, 10), y_tr[idx].reshape(-1)) + lam * inner
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    return net


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def eval_plain(net: Net, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """frozen / ttt: every stream in one padded batch with a padding mask; each stream is on its own
    (the adapter's state is per stream and starts fresh, BatchNorm uses running statistics)."""
    net.eval()
    L = max(len(y) for y in ys)
    x = torch.zeros(len(xs), L, xs[0].shape[-1])
    y = torch.full((len(ys), L), -1, dtype=torch.long)
    mask = torch.zeros(len(xs), L, dtype=torch.bool)
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        x[i, :len(yi)], y[i, :len(yi)], mask[i, :len(yi)] = xi, yi, True
    logits, _ = net(x, mask)
    return int(((logits.argmax(-1) == y) & mask).sum()) / int(mask.sum())


def eval_tent(net: Net, xs, ys, lr: float, batch: int) -> float:
    trained = copy.deepcopy(net.state_dict())
    correct = 0
    for x, y in zip(xs, ys):
        net.load_state_dict(trained)                                  # reset per stream
        net.eval()
        for bn in (net.bn1, net.bn2):
            bn.train()                                                # test-batch statistics
            bn.track_running_stats = True
        params = [p for bn in (net.bn1, net.bn2) for p in (bn.weight, bn.bias)]
        for p in net.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        for xb, yb in zip(x.split(batch), y.split(batch)):
            logits, _ = net(xb[None])
            logits = logits[0]
            correct += int((logits.argmax(-1) == yb).sum())           # predict, then adapt
            p = logits.softmax(-1)
            ent = -(p * logits.log_softmax(-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            ent.backward()
            opt.step()
    net.load_state_dict(trained)
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return correct / sum(len(y) for y in ys)


def evaluate(method: str, net: Net, split, shifts, args, seed: int, tent_cfg=None) -> dict[str, float]:
    out = {}
    for shift in shifts:
        xs, ys = make_streams(*split, args.stream, shift, seed)
        out[shift] = eval_tent(net, xs, ys, *tent_cfg) if method == "tent" else eval_plain(net, xs, ys)
    return out


# -- FSDD: spoken digits from a speaker never heard in training ---------------------------------
FSDD_VAL_SPEAKER = "yweweler"      # hyperparameter selection only; never a reported test speaker
FSDD_REPORTED = ["clean", "speaker"]


def fsdd_table(max_take: int | None = None) -> dict[str, np.ndarray] | None:
    """Every FSDD clip as the 64-dim mean / std log-mel of continual.py (raw, not standardised):
    x (N, 64), digit y, speaker, take. None when the data is absent. max_take keeps takes < max_take."""
    import importlib.util

    from edge_glass.media.audio import load_audio
    from edge_glass.paths import data_root

    files = sorted((data_root() / "fsdd" / "recordings").glob("*.wav"))
    if not files:
        return None
    spec = importlib.util.spec_from_file_location("bench_nested_continual_feats", Path(__file__).with_name("continual.py"))
    cont = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cont)
    filters = cont._mel_filters(8000, 256, 32)
    feats, ys, spk, take = [], [], [], []
    for f in files:
        digit, speaker, t = f.stem.split("_")
        if max_take is not None and int(t) >= max_take:
            continue
        feats.append(cont.log_mel_stats(load_audio(f, sr=8000).astype(np.float64), filters))
        ys.append(int(digit))
        spk.append(speaker)
        take.append(int(t))
    return {"x": np.stack(feats), "y": np.array(ys), "speaker": np.array(spk), "take": np.array(take)}


def fsdd_fold(table: dict[str, np.ndarray], test_speaker: str, n_train_takes_from: int = 10) -> dict:
    """One speaker-shift fold. The other speakers' takes >= 10 train the model (standardised with
    their mean / std), their takes 0-4 are the clean stream and their takes 5-9 clean validation;
    every clip of test_speaker is the shifted stream (a speaker never heard in training)."""
    other = table["speaker"] != test_speaker
    tr = other & (table["take"] >= n_train_takes_from)
    mu, sd = table["x"][tr].mean(0), table["x"][tr].std(0) + 1e-6
    x = ((table["x"] - mu) / sd).astype(np.float32)
    y = table["y"]
    pick = lambda m: (x[m], y[m])
    return {"train": pick(tr), "train_groups": table["speaker"][tr], "augment": False,
            "clean": pick(other & (table["take"] < 5)),
            "clean_val": pick(other & (table["take"] >= 5) & (table["take"] < n_train_takes_from)),
            "speaker": pick(~other)}


def evaluate_fsdd(method: str, net: Net, fold: dict, which: dict[str, str], args, seed: int, tent_cfg=None) -> dict:
    """which: reported name -> fold key (e.g. {"clean": "clean", "speaker": "speaker"})."""
    out = {}
    for name, key in which.items():
        xs, ys = make_streams(*fold[key], args.stream, "clean", seed)   # the shift is in the data itself
        out[name] = eval_tent(net, xs, ys, *tent_cfg) if method == "tent" else eval_plain(net, xs, ys)
    return out


def main_fsdd(args, grid_ttt: dict, grid_tent: dict) -> dict:
    """The speaker-shift stream (module doc): selection on FSDD_VAL_SPEAKER, report on the others."""
    t0 = time.time()
    table = fsdd_table(max_take=10 if args.quick else None)
    if table is None:
        from edge_glass.paths import data_root

        print(f"fsdd: data not found under {data_root()} (set EDGE_GLASS_DATA); skipped", file=sys.stderr)
        return {"benchmark": "ttt_shift", "dataset": "fsdd", "results": [], "skipped": True}
    speakers = sorted(set(table["speaker"].tolist()))
    tests = [s_ for s_ in speakers if s_ != FSDD_VAL_SPEAKER]
    if args.quick:
        tests = tests[:1]
    n_tr_from = 6 if args.quick else 10
    sel_which = {"clean": "clean_val", "speaker": "speaker"}

    # -- selection: validation speaker (its clips) and clean validation takes, seed 0
    selection = []
    sel_fold = fsdd_fold(table, FSDD_VAL_SPEAKER, n_tr_from)
    frozen0 = train(None, 0.0, sel_fold, args, seed=0)
    base_val = evaluate_fsdd("frozen", frozen0, sel_fold, sel_which, args, 0)
    selection.append({"method": "frozen", "config": {}, "val": base_val, "score": statistics.mean(base_val.values())})
    best_tent, best_tent_score = None, -1.0
    for lr, batch in itertools.product(grid_tent["lr"], grid_tent["batch"]):
        val = evaluate_fsdd("tent", frozen0, sel_fold, sel_which, args, 0, (lr, batch))
        score = statistics.mean(val.values())
        selection.append({"method": "tent", "config": {"lr": lr, "batch": batch}, "val": val, "score": score})
        if score > best_tent_score:
            best_tent, best_tent_score = (lr, batch), score
    best_ttt, best_ttt_score = None, -1.0
    for eta, b, lam in itertools.product(grid_ttt["eta"], grid_ttt["mini_batch_size"], grid_ttt["lam"]):
        cfg = {"rank": args.rank, "eta": eta, "mini_batch_size": b}
        net = train(cfg, lam, sel_fold, args, seed=0)
        val = evaluate_fsdd("ttt", net, sel_fold, sel_which, args, 0)
        score = statistics.mean(val.values())
        selection.append({"method": "ttt", "config": {**cfg, "lam": lam}, "val": val, "score": score})
        if score > best_ttt_score:
            best_ttt, best_ttt_score = (cfg, lam), score

    # -- report: each other speaker held out in turn, --seeds seeds per fold
    which = {"clean": "clean", "speaker": "speaker"}
    acc: dict[tuple[str, str], list[float]] = {}
    per_speaker: dict[str, dict[str, list[float]]] = {}
    for spk in tests:
        fold = fsdd_fold(table, spk, n_tr_from)
        for seed in range(args.seeds):
            frozen = train(None, 0.0, fold, args, seed)
            ttt = train(best_ttt[0], best_ttt[1], fold, args, seed)
            for method, net in (("frozen", frozen), ("tent", frozen), ("ttt-noupdate", ttt), ("ttt", ttt)):
                ttt.first.eta = 0.0 if method == "ttt-noupdate" else best_ttt[0]["eta"]
                res = evaluate_fsdd(method, net, fold, which, args, seed, best_tent)
                for shift, a in res.items():
                    acc.setdefault((method, shift), []).append(100.0 * a)
                per_speaker.setdefault(spk, {}).setdefault(method, []).append(100.0 * res["speaker"])
            print(f"fsdd fold {spk} seed {seed}: " + ", ".join(
                f"{m} {statistics.mean(per_speaker[spk][m][-1:]):.1f}" for m in per_speaker[spk]), file=sys.stderr, flush=True)
    configs = {"frozen": {}, "tent": {"lr": best_tent[0], "batch": best_tent[1]},
               "ttt": {**best_ttt[0], "lam": best_ttt[1]}, "ttt-noupdate": {**best_ttt[0], "eta": 0.0}}
    results = [{"method": m, "shift": sh, "accuracy_mean": statistics.mean(v),
                "accuracy_std": statistics.stdev(v) if len(v) > 1 else 0.0, "accuracies": v, "seeds": args.seeds,
                "folds": tests, "config": configs[m]} for (m, sh), v in acc.items()]
    elapsed = time.time() - t0
    mean = {(r["method"], r["shift"]): r for r in results}
    print(f"FSDD spoken digits, one speaker held out per fold ({', '.join(tests)}; selection on "
          f"{FSDD_VAL_SPEAKER}, never reported), streams of {args.stream} clips, accuracy % mean ± std over "
          f"{len(tests)} folds x {args.seeds} seeds\n")
    print("| method | config | clean (takes 0-4 of the training speakers) | unseen speaker | Δ speaker vs frozen | Δ clean vs frozen |")
    print("|---|---|---|---|---|---|")
    for m in ("frozen", "tent", "ttt-noupdate", "ttt"):
        c, sp = mean[(m, "clean")], mean[(m, "speaker")]
        cfg = ", ".join(f"{k} {v}" for k, v in configs[m].items()) or "-"
        print(f"| {m} | {cfg} | {c['accuracy_mean']:.1f} ± {c['accuracy_std']:.1f} | {sp['accuracy_mean']:.1f} ± "
              f"{sp['accuracy_std']:.1f} | {sp['accuracy_mean'] - mean[('frozen', 'speaker')]['accuracy_mean']:+.1f} | "
              f"{c['accuracy_mean'] - mean[('frozen', 'clean')]['accuracy_mean']:+.1f} |")
    print("\nper held-out speaker (unseen-speaker accuracy, mean over seeds):")
    for spk, rows in per_speaker.items():
        print(f"  {spk:9s} " + "  ".join(f"{m} {statistics.mean(v):.1f}" for m, v in rows.items()))
    print("\nselection (seed 0, validation speaker + clean validation takes):")
    for r in selection:
        cfg = ", ".join(f"{k} {v}" for k, v in r["config"].items()) or "-"
        print(f"  {r['method']:6s} {cfg:48s} " + "  ".join(f"{k} {100 * v:.1f}" for k, v in r["val"].items())
              + f"  -> {100 * r['score']:.2f}")
    print(f"\n{elapsed:.0f} s, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    doc = {"benchmark": "ttt_shift", "dataset": "fsdd", "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                for k, v in vars(args).items()},
           "reported_shifts": FSDD_REPORTED, "validation_speaker": FSDD_VAL_SPEAKER, "test_speakers": tests,
           "results": results, "per_speaker": per_speaker, "selection": selection, "elapsed_s": elapsed}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    return doc


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--stream", type=int, default=120, help="images per stream (train and test)")
    ap.add_argument("--train-streams", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--offset", type=float, default=0.3, help="std of the per-stream pixel offset pattern in training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (2 seeds, <= 30 steps, one config per method)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dataset", choices=["digits", "fsdd"], default="digits",
                    help="digits: synthetic shifts of sklearn digits; fsdd: spoken digits from an unseen speaker")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid_ttt = {"eta": [0.5, 0.9], "mini_batch_size": [4, 16], "lam": [0.0, 0.1]}
    grid_tent = {"lr": [1e-3, 1e-2], "batch": [20, 40]}
    if args.quick:
        args.seeds, args.steps = 2, min(args.steps, 30)
        grid_ttt = {"eta": [0.5], "mini_batch_size": [16], "lam": [0.1]}
        grid_tent = {"lr": [1e-3], "batch": [40]}
    if args.dataset == "fsdd":
        return main_fsdd(args, grid_ttt, grid_tent)
    t0 = time.time()
    data = digits_split()

    # -- selection: seed 0, validation split, selection shifts only
    selection = []
    frozen0 = train(None, 0.0, data, args, seed=0)
    base_val = evaluate("frozen", frozen0, data["val"], SELECTION, args, 0)
    selection.append({"method": "frozen", "config": {}, "val": base_val, "score": statistics.mean(base_val.values())})
    best_tent, best_tent_score = None, -1.0
    for lr, batch in itertools.product(grid_tent["lr"], grid_tent["batch"]):
        val = evaluate("tent", frozen0, data["val"], SELECTION, args, 0, (lr, batch))
        score = statistics.mean(val.values())
        selection.append({"method": "tent", "config": {"lr": lr, "batch": batch}, "val": val, "score": score})
        if score > best_tent_score:
            best_tent, best_tent_score = (lr, batch), score
    best_ttt, best_ttt_score = None, -1.0
    for eta, b, lam in itertools.product(grid_ttt["eta"], grid_ttt["mini_batch_size"], grid_ttt["lam"]):
        cfg = {"rank": args.rank, "eta": eta, "mini_batch_size": b}
        net = train(cfg, lam, data, args, seed=0)
        val = evaluate("ttt", net, data["val"], SELECTION, args, 0)
        score = statistics.mean(val.values())
        selection.append({"method": "ttt", "config": {**cfg, "lam": lam}, "val": val, "score": score})
        if score > best_ttt_score:
            best_ttt, best_ttt_score = (cfg, lam), score

    # -- report: every seed, test split, reported shifts
    acc: dict[tuple[str, str], list[float]] = {}
    for seed in range(args.seeds):
        frozen = frozen0 if seed == 0 else train(None, 0.0, data, args, seed)
        ttt = train(best_ttt[0], best_ttt[1], data, args, seed)
        for method, net in (("frozen", frozen), ("tent", frozen), ("ttt-noupdate", ttt), ("ttt", ttt)):
            ttt.first.eta = 0.0 if method == "ttt-noupdate" else best_ttt[0]["eta"]
            res = evaluate(method, net, data["test"], REPORTED, args, seed, best_tent)
            for shift, a in res.items():
                acc.setdefault((method, shift), []).append(100.0 * a)
    configs = {"frozen": {}, "tent": {"lr": best_tent[0], "batch": best_tent[1]},
               "ttt": {**best_ttt[0], "lam": best_ttt[1]}, "ttt-noupdate": {**best_ttt[0], "eta": 0.0}}
    results = []
    for (method, shift), vals in acc.items():
        results.append({"method": method, "shift": shift, "accuracy_mean": statistics.mean(vals),
                        "accuracy_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "accuracies": vals, "seeds": len(vals), "config": configs[method]})
    elapsed = time.time() - t0

    mean = {(r["method"], r["shift"]): r for r in results}
    print(f"digits, test split ({len(data['test'][1])} images, streams of {args.stream}), accuracy % "
          f"mean ± std over {args.seeds} seeds; hyperparameters picked on the validation split under "
          f"{'/'.join(SELECTION[1:])} (never the reported shifts)\n")
    print("| method | config | " + " | ".join(REPORTED) + " | mean shifted | Δ shifted vs frozen | Δ clean vs frozen |")
    print("|---|---|" + "---|" * (len(REPORTED) + 3))
    shifted = REPORTED[1:]
    fz_shift = statistics.mean(mean[("frozen", s)]["accuracy_mean"] for s in shifted)
    for method in ("frozen", "tent", "ttt-noupdate", "ttt"):
        cells = [f"{mean[(method, s)]['accuracy_mean']:.1f} ± {mean[(method, s)]['accuracy_std']:.1f}" for s in REPORTED]
        ms = statistics.mean(mean[(method, s)]["accuracy_mean"] for s in shifted)
        dc = mean[(method, "clean")]["accuracy_mean"] - mean[("frozen", "clean")]["accuracy_mean"]
        cfg = ", ".join(f"{k} {v}" for k, v in configs[method].items()) or "-"
        print(f"| {method} | {cfg} | " + " | ".join(cells) + f" | {ms:.1f} | {ms - fz_shift:+.1f} | {dc:+.1f} |")
    print("\nselection (seed 0, validation split, accuracy):")
    for s in selection:
        cfg = ", ".join(f"{k} {v}" for k, v in s["config"].items()) or "-"
        print(f"  {s['method']:6s} {cfg:48s} " + "  ".join(f"{k} {100 * v:.1f}" for k, v in s["val"].items())
              + f"  -> {100 * s['score']:.2f}")
    print(f"\n{elapsed:.0f} s, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    doc = {"benchmark": "ttt_shift", "dataset": "sklearn load_digits", "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                               for k, v in vars(args).items()},
           "reported_shifts": REPORTED, "selection_shifts": SELECTION, "results": results,
           "selection": selection, "elapsed_s": elapsed}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
