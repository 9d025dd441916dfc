"""Multi-query associative recall (MQAR, Zoology-style): how much a token mixer can store and recall.

A sequence starts with P key-value pairs ``k1 v1 k2 v2 ...`` (keys from the first half of the
vocabulary, values from the second, keys distinct), followed by a query section of filler tokens
(id 0) in which every key appears once more at a random position; the model must predict the key's
value at that position. Only query positions are scored. The query section is ``length - 2P``
tokens long, so a length holds at most ``length // 3`` pairs.

Models are equal in everything but the mixer (2 blocks of mixer + MLP, d_model 64, head dim 16,
4 heads, the same short causal convolution on q/k/v in every mixer, no positional embedding):

    softmax         full causal softmax attention (the reference: it can always look back)
    sliding_window  softmax attention over the last ``--window`` tokens
    linear          additive fast weights   S_t = S_{t-1} + v_t k_t^T
    delta           delta rule              S_t = S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T
    gated_delta     gated delta rule        S_t = a_t S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T
    hope            gated delta with self-modifying projections (edge_glass.nested.hope)

Each model trains at ``--train-length`` on fresh random batches and is tested on 1024 held-out
sequences at every ``--test-lengths`` (longer = more filler between a pair and its query).
``--forget F``: a second section re-assigns F of the keys to new values before the queries, and
the answer is the newest value (a memory must overwrite, not accumulate).
``--optimizers adamw sgd dmgd``: the same model under each optimizer (DMGD: edge_glass.nested.dmgd).

    python benchmarks/nested/mqar.py --json runs/bench/nested/mqar.json           # every model, 16 pairs
    python benchmarks/nested/mqar.py --pairs 16 32 --steps 2000                   # a bigger sweep (a GPU's job)
    python benchmarks/nested/mqar.py --models linear gated_delta --forget 8 --json runs/bench/nested/mqar_forget.json
    python benchmarks/nested/mqar.py --models delta --optimizers sgd dmgd --json runs/bench/nested/mqar_optim.json
    python benchmarks/nested/mqar.py --quick                                        # smoke test

Defaults (16 pairs, 700 steps of batch 48, vocabulary 128) are sized for the 2-core CPU: a few
minutes per model. 64 pairs need length >= 192, so they cannot be trained at length 128.

``--json FILE`` writes ``{"results": [{"model", "length", "pairs", "accuracy", ...}], "config": ...}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_glass.nested.attention import SoftmaxAttention

MODELS = ("softmax", "sliding_window", "linear", "delta", "gated_delta", "hope")


def mqar_batch(rng: np.random.Generator, n: int, length: int, pairs: int, vocab: int, forget: int = 0):
    """(tokens, targets) int64 arrays of shape (n, length); targets are -100 except at queries."""
    half = vocab // 2
    if pairs > half - 1:
        raise ValueError(f"{pairs} pairs need more than {half - 1} distinct keys (vocab {vocab})")
    kv_len = 2 * (pairs + forget)
    if length - kv_len < pairs:
        raise ValueError(f"length {length} holds no query section for {pairs} pairs (+{forget} re-assigned): "
                         f"need >= {kv_len + pairs}")
    tokens = np.zeros((n, length), dtype=np.int64)
    targets = np.full((n, length), -100, dtype=np.int64)
    for row in range(n):
        keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
        values = rng.integers(half, vocab, size=pairs)
        tokens[row, 0:2 * pairs:2] = keys
        tokens[row, 1:2 * pairs:2] = values
        if forget:
            again = rng.choice(pairs, size=forget, replace=False)
            new = rng.integers(half, vocab, size=forget)
            base = 2 * pairs
            tokens[row, base:base + 2 * forget:2] = keys[again]
            tokens[row, base + 1:base + 2 * forget:2] = new
            values = values.copy()
            values[again] = new
        where = kv_len + rng.choice(length - kv_len, size=pairs, replace=False)
        tokens[row, where] = keys
        targets[row, where] = values
    return torch.from_numpy(tokens), torch.from_numpy(targets)


def make_mixer(name: str, d_model: int, n_heads: int, window: int, chunk_size: int) -> nn.Module:
    if name == "softmax":
        return SoftmaxAttention(d_model, n_heads)
    if name == "sliding_window":
        return SoftmaxAttention(d_model, n_heads, window=window)
    if name in ("linear", "delta", "gated_delta"):
        from edge_glass.nested.fast_weights import FastWeightAttention

        return FastWeightAttention(d_model, n_heads, rule=name, chunk_size=chunk_size)
    if name == "hope":
        from edge_glass.nested.hope import HopeAttention

        return HopeAttention(d_model, n_heads, chunk_size=chunk_size)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class RecallModel(nn.Module):
    def __init__(self, name: str, vocab: int, d_model: int = 64, n_layers: int = 2, head_dim: int = 16,
                 window: int = 32, chunk_size: int = 32):
        super().__init__()
        n_heads = d_model // head_dim
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(make_mixer(name, d_model, n_heads, window, chunk_size), d_model)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_optimizer(name: str, params, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "dmgd":
        from edge_glass.nested.dmgd import DMGD

        return DMGD(params, lr=lr, memory="mlp")
    raise ValueError(f"unknown optimizer {name!r} (adamw | sgd | dmgd)")


@torch.no_grad()
def accuracy(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    hit = total = 0
    for i in range(0, len(tokens), batch):
        logits = model(tokens[i:i + batch])
        t = targets[i:i + batch]
        scored = t != -100
        hit += int((logits.argmax(-1)[scored] == t[scored]).sum())
        total += int(scored.sum())
    model.train()
    return hit / max(total, 1)


def train_one(name: str, pairs: int, args, optimizer: str = "adamw") -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = RecallModel(name, args.vocab, args.d_model, args.layers, args.head_dim, args.window, args.chunk_size)
    lr = args.lr if optimizer == "adamw" else args.lr * 10  # SGD-type updates are not normalised: 10x
    opt = make_optimizer(optimizer, model.parameters(), lr)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        x, y = mqar_batch(rng, args.batch, args.train_length, pairs, args.vocab, args.forget)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    rows = []
    test_rng = np.random.default_rng(10_000 + args.seed)
    for length in args.test_lengths:
        x, y = mqar_batch(test_rng, args.test_n, length, pairs, args.vocab, args.forget)
        rows.append({"model": name, "length": length, "pairs": pairs, "accuracy": accuracy(model, x, y),
                     "train_length": args.train_length, "forget": args.forget, "optimizer": optimizer,
                     "steps": args.steps, "params": sum(p.numel() for p in model.parameters()),
                     "final_train_loss": float(np.mean(losses[-20:])), "train_s": round(train_s, 1),
                     "seed": args.seed})
    return rows


def table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    out = ["| model | optimizer | pairs | params | " + " | ".join(f"acc @ {n}" for n in lengths) + " | train s |",
           "|---|---|---|---|" + "---|" * len(lengths) + "---|"]
    keyed: dict[tuple, dict] = {}
    for r in rows:
        keyed.setdefault((r["model"], r["optimizer"], r["pairs"]), {})[r["length"]] = r
    for (model, opt, pairs), by_len in keyed.items():
        any_row = next(iter(by_len.values()))
        accs = " | ".join(f"{by_len[n]['accuracy']:.3f}" if n in by_len else "-" for n in lengths)
        out.append(f"| {model} | {opt} | {pairs} | {any_row['params']:,} | {accs} | {any_row['train_s']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--pairs", nargs="+", type=int, default=[16])
    p.add_argument("--train-length", type=int, default=128)
    p.add_argument("--test-lengths", nargs="+", type=int, default=[128, 256])
    p.add_argument("--forget", type=int, default=0, help="keys re-assigned to new values before the queries")
    p.add_argument("--optimizers", nargs="+", default=["adamw"], choices=["adamw", "sgd", "dmgd"])
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--test-n", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke test: 2 pair counts, 30 steps, small test set")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.test_n, args.batch = args.pairs[:2], 30, 64, 16
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for pairs in args.pairs:
        for optimizer in args.optimizers:
            for name in args.models:
                new = train_one(name, pairs, args, optimizer)
                rows.extend(new)
                print(" ".join(f"{k}={v}" for k, v in new[0].items() if k in ("model", "optimizer", "pairs", "train_s")),
                      " ".join(f"acc@{r['length']}={r['accuracy']:.3f}" for r in new), file=sys.stderr, flush=True)
                if args.json:  # keep what is done if a long sweep is interrupted
                    _write(args, rows)
    print(table(rows))
    if args.json:
        _write(args, rows)
    return rows


def _write(args, rows):
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    path.write_text(json.dumps({"results": rows, "config": config}, indent=1))


if __name__ == "__main__":
    main()
