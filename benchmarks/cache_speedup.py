"""Epoch time training from the frozen-feature cache vs re-encoding every step.

    python benchmarks/cache_speedup.py [--config configs/quickstart.yaml] [--threads 2]

Trains one epoch of the config twice (cache on, fp32; cache off = the backbones run on every
batch) and compares the time of the training loop (data preparation and the cache fill excluded;
summary.json's train_seconds) and the loss curves.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from edge_glass.config import load_config
from edge_glass.train.loop import train


def one_epoch(config: str, cache: bool, threads: int, out: Path) -> tuple[float, list[float]]:
    overrides = ["train.epochs=1", f"train.threads={threads}", "cache.dtype=float32", f"cache.enabled={str(cache).lower()}",
                 "train.log_every=1", "train.checkpoint_every=100000"]
    cfg = load_config(config, overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    return summary["train_seconds"], losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cached, l1 = one_epoch(args.config, True, args.threads, Path(tmp) / "cached")
        live, l2 = one_epoch(args.config, False, args.threads, Path(tmp) / "live")
    gap = max(abs(a - b) / abs(b) for a, b in zip(l1, l2))
    print(f"{args.config}: one epoch, {len(l1)} steps, {args.threads} threads")
    print(f"  from cache:          {cached:8.2f} s")
    print(f"  re-encoding inputs:  {live:8.2f} s")
    print(f"  speed-up:            {live / cached:8.1f}x   (max relative loss difference {gap:.1e})")


if __name__ == "__main__":
    main()
