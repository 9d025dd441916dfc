"""Peak memory of a cached-feature training epoch as the cache grows: features larger than RAM.

    python benchmarks/cache_rss.py [--config configs/quickstart.yaml] [--factors 1 4 16] [--threads 2]
                                   [--work DIR] [--json cache_rss.json]

Fills (or finds) the config's feature cache for its training data, then replicates every shard
of it 1x, 4x, 16x under distinct keys (a copy of the shard with "@r" appended to each key: the
same bytes, other items). For each size and each way of reading the cache, a fresh subprocess
trains one epoch of the config with the real training loop (train/loop.py: the alignment task's
loss, heads, AdamW, checkpoint) over every replica of every training pair, and reports its peak
RSS (/proc/self/status VmHWM; getrusage ru_maxrss is recorded too, but it can include the
parent's RSS at fork time) and samples/s (summary.json's train_seconds). Modes:

    pread-cold  ShardedFeatureTable, reader pread (the default), the cache's pages evicted from the
                OS page cache first (posix_fadvise DONTNEED on this benchmark's own files)
    pread       the same, page cache warm
    mmap(-cold) ShardedFeatureTable, reader mmap
    in-ram      FeatureCache.load(..., in_memory=True): the whole table in RAM (the old behaviour)

It also times one training batch (128 random pairs, image and text) from the largest cache, read
four ways: ShardedFeatureTable.batch with each reader (pread: os.preadv of each item's bytes;
mmap: torch.frombuffer views + index_select + madvise), safetensors safe_open + get_slice per
item, and the in-RAM FeatureTable.
Prints markdown tables and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_kb() -> dict[str, int]:
    """Peak and current resident memory of this process (kB), current split into anonymous and file-backed."""
    out = {"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


# --- replicas ------------------------------------------------------------------------------------

def replicate_shard(src: Path, dst: Path, suffix: str) -> None:
    """``src`` with every key + ``suffix``: a new safetensors header (same tensors, same relative
    offsets), then the data region copied as bytes."""
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header["__metadata__"]
        meta["keys"] = json.dumps([k + suffix for k in json.loads(meta["keys"])])
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
        tmp = dst.with_name(dst.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(f, out, 16 << 20)
        os.replace(tmp, dst)


def build_sizes(cache_dirs: list[Path], work: Path, factors: list[int]) -> dict[int, Path]:
    """work/x<k>/<cache id>/: the original shards (symlinked) + replicas 1..k-1 of each."""
    replicas = work / "replicas"
    roots = {}
    for k in factors:
        root = work / f"x{k}"
        for d in cache_dirs:
            (root / d.name).mkdir(parents=True, exist_ok=True)
            (replicas / d.name).mkdir(parents=True, exist_ok=True)
            for shard in sorted(d.glob("shard-*.safetensors")):
                for r in range(k):
                    if r == 0:
                        target = shard
                    else:
                        target = replicas / d.name / f"shard-r{r:03d}-{shard.name[6:]}"
                        if not target.exists():
                            replicate_shard(shard, target, f"@{r}")
                    link = root / d.name / target.name
                    if not link.exists():
                        link.symlink_to(target.resolve())
        roots[k] = root
    return roots


def evict(root: Path) -> None:
    """Drop this benchmark's cache files from the OS page cache (only these files)."""
    for f in root.rglob("shard-*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- the child: one epoch over a replicated cache --------------------------------------------------

def replicated_data(cfg, encoders, root: Path, pairs: list[list[str]], factor: int, mode: str):
    """PairedData of every replica of every training pair, tables read from ``root``."""
    from edge_glass.data.samples import Sample
    from edge_glass.features.cache import FeatureCache
    from edge_glass.features.pipeline import PairedData

    mods = list(cfg.encoders)
    unique = {m: list(dict.fromkeys(p[1 + i] for p in pairs)) for i, m in enumerate(mods)}
    pos = {m: {k: j for j, k in enumerate(keys)} for m, keys in unique.items()}
    tables, rows = {}, {}
    for i, m in enumerate(mods):
        cache = FeatureCache(root, encoders[m], cfg.cache.dtype, cfg.cache.shard_size)
        keys = [k if r == 0 else f"{k}@{r}" for r in range(factor) for k in unique[m]]
        tables[m] = cache.load(keys, in_memory=mode == "in-ram", reader="mmap" if mode.startswith("mmap") else "pread")
        del cache
        one = torch.tensor([pos[m][p[1 + i]] for p in pairs], dtype=torch.long)
        rows[m] = torch.cat([one + r * len(unique[m]) for r in range(factor)])
    samples = [Sample(group=f"{r}|{p[0]}", source="replica") for r in range(factor) for p in pairs]
    return PairedData(samples, rows, tables)


def child(args) -> None:
    from edge_glass.config import load_config
    from edge_glass.runs import RunDir
    from edge_glass.tasks.alignment import AlignmentTask
    from edge_glass.train.loop import _train, make_accelerator

    torch.set_num_threads(args.threads)
    base = rss_kb()
    cfg = load_config(args.config, overrides(args.threads))
    pairs = json.loads(Path(args.pairs).read_text())

    class Replicated(AlignmentTask):
        def load(self, report, progress):
            data = replicated_data(self.cfg, self.encoders, Path(args.root), pairs, args.factor, args.mode)
            self.loaded_rss = rss_kb()
            return {"train": data, "val": data.select([]), "test": data.select([])}

    acc = make_accelerator(cfg.train)
    task = Replicated(cfg, acc.device)
    run = RunDir(args.out)
    run.write_config(cfg)
    _train(cfg, task, acc, run, False, False)
    s = json.loads((Path(args.out) / "summary.json").read_text())
    n = s["steps"] * cfg.train.batch_size
    print(json.dumps({"factor": args.factor, "mode": args.mode, "samples": n, "steps": s["steps"],
                      "train_seconds": s["train_seconds"], "samples_per_s": n / s["train_seconds"],
                      "data_seconds": s["data_seconds"], "after_imports": base, "after_load": task.loaded_rss, "end": rss_kb()}))


def peak(run: dict) -> int:
    """The child's own peak RSS, kB: /proc VmHWM (ru_maxrss can include the parent's RSS at fork)."""
    return run["end"].get("VmHWM", run["end"]["peak_rss_kb"])


def overrides(threads: int) -> list[str]:
    return ["train.epochs=1", f"train.threads={threads}", "train.checkpoint_every=1000000", "train.log_every=50",
            "train.eval_every=1000000"]


# --- per-batch read cost ---------------------------------------------------------------------------

def time_readers(cfg, encoders, root: Path, pairs, factor: int, batches: int) -> dict[str, dict[str, float]]:
    """Per training batch (all modalities), median wall ms and mean CPU ms (user + system) of
    four readers, interleaved batch by batch (the machine may be shared)."""
    from safetensors import safe_open

    data = {mode: replicated_data(cfg, encoders, root, pairs, factor, mode) for mode in ("pread", "mmap", "in-ram")}
    tables = data["pread"].tables
    g = torch.Generator().manual_seed(0)
    order = [torch.randperm(len(data["pread"]), generator=g)[: cfg.train.batch_size] for _ in range(batches + 1)]
    handles: dict[tuple[str, int], Any] = {}

    def get_slice(idx):  # safetensors' own (mmap) reader, one handle per shard kept open, one slice per item
        for m, t in tables.items():
            r = data["pread"].rows[m][idx]
            lens = t.lengths[r]
            tok = torch.zeros(len(r), int(lens.max()), t.dim)
            pooled = torch.empty(len(r), t.pooled_dim)
            for i, row in enumerate(r.tolist()):
                s = int(t.shard[row])
                f = handles.get((m, s)) or handles.setdefault((m, s), safe_open(str(t.headers[s].path), framework="pt"))
                a, n, pr = int(t.start[row]), int(lens[i]), int(t.row[row])
                tok[i, :n] = f.get_slice("tokens")[a : a + n].float()
                pooled[i] = f.get_slice("pooled")[pr : pr + 1].float()[0]

    readers = {"pread": data["pread"].batch, "mmap": data["mmap"].batch, "safe_open_get_slice": get_slice, "in_ram": data["in-ram"].batch}
    wall: dict[str, list[float]] = {k: [] for k in readers}
    cpu: dict[str, float] = dict.fromkeys(readers, 0.0)
    for i, idx in enumerate(order):
        for name, fn in readers.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(idx)
            if i:  # the first batch warms up: files and handles open
                wall[name].append(time.perf_counter() - t0)
                cpu[name] += time.process_time() - c0
    return {k: {"wall_ms_median": 1000 * statistics.median(wall[k]), "cpu_ms_mean": 1000 * cpu[k] / batches} for k in readers}


# --- the parent ------------------------------------------------------------------------------------

def training_pairs(cfg, progress: bool) -> tuple[list[list[str]], list[Path]]:
    """(group, key per modality) of every training pair, after filling the config's cache; and the cache folders."""
    from edge_glass.data.samples import DataReport
    from edge_glass.features.cache import feature_cache_dir
    from edge_glass.tasks.alignment import AlignmentTask

    task = AlignmentTask(cfg)
    train = task.load(DataReport(), progress)["train"]
    mods = list(cfg.encoders)
    pairs = [[s.group] + [task.encoders[m].content_key(getattr(s, m)) for m in mods] for s in train.samples]
    root = feature_cache_dir(cfg)
    return pairs, [root / task.encoders[m].cache_id() for m in mods]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--modes", nargs="+", default=["pread-cold", "pread", "mmap", "in-ram"],
                    choices=["pread-cold", "pread", "mmap-cold", "mmap", "in-ram"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30, help="batches timed per reader")
    ap.add_argument("--work", help="folder for the replicated shards (default: a temporary one, removed)")
    ap.add_argument("--json", default="cache_rss.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--factor", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from edge_glass.config import load_config
    from edge_glass.tasks.alignment import build_run_encoders

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides(args.threads))
    pairs, cache_dirs = training_pairs(cfg, progress=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cache_rss."))
    work.mkdir(parents=True, exist_ok=True)
    (work / "pairs.json").write_text(json.dumps(pairs))
    try:
        roots = build_sizes(cache_dirs, work, args.factors)
        runs = []
        for k in args.factors:
            size = sum(f.stat().st_size for f in roots[k].rglob("shard-*.safetensors"))
            shards = len(list(roots[k].rglob("shard-*.safetensors")))
            for mode in args.modes:
                if mode.endswith("-cold"):
                    evict(roots[k])
                out = work / f"run-x{k}-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, __file__, "--child", "--config", args.config, "--threads", str(args.threads), "--factor", str(k),
                       "--mode", mode, "--root", str(roots[k]), "--pairs", str(work / "pairs.json"), "--out", str(out)]
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"child failed ({' '.join(cmd)}):\n{p.stderr[-4000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(cache_bytes=size, shards=shards)
                runs.append(r)
                print(f"x{k:<3} {mode:<10} peak RSS {peak(r) / 1024:7.0f} MB  {r['samples_per_s']:8.0f} samples/s", flush=True)
        readers = time_readers(cfg, build_run_encoders(cfg), roots[max(args.factors)], pairs, max(args.factors), args.batches)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    base = {r["mode"]: peak(r) for r in runs if r["factor"] == min(args.factors)}
    print(f"\n{args.config}: one epoch (batch {cfg.train.batch_size}, {args.threads} threads) over every replica of "
          f"{len(pairs)} training pairs")
    print("\n| cache | shards | cache on disk | read as | samples | peak RSS | vs 1x | RSS file-backed at end | samples/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        e = r["end"]
        print(f"| {r['factor']}x | {r['shards']} | {r['cache_bytes'] / 1e9:.2f} GB | {r['mode']} | {r['samples']} | "
              f"{peak(r) / 1024:.0f} MB | {peak(r) / base[r['mode']]:.3f} | {e.get('RssFile', 0) / 1024:.0f} MB | "
              f"{r['samples_per_s']:.0f} |")
    k = max(args.factors)
    print(f"\nOne training batch ({cfg.train.batch_size} pairs, every modality) from the {k}x cache, page cache warm, "
          f"{args.batches} batches:")
    print("\n| reader | wall ms / batch (median) | CPU ms / batch (mean) |\n|---|---|---|")
    for name, label in (("pread", "ShardedFeatureTable, reader pread: os.preadv of each item's bytes (the default)"),
                        ("mmap", "ShardedFeatureTable, reader mmap: torch.frombuffer views + index_select + madvise"),
                        ("safe_open_get_slice", "safetensors safe_open + get_slice per item"),
                        ("in_ram", "in-RAM FeatureTable (whole table loaded)")):
        print(f"| {label} | {readers[name]['wall_ms_median']:.1f} | {readers[name]['cpu_ms_mean']:.1f} |")
    Path(args.json).write_text(json.dumps({"config": args.config, "threads": args.threads, "pairs": len(pairs),
                                           "runs": runs, "readers": readers}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
