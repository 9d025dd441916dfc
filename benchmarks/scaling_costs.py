"""Per-sample costs that SCALING.md multiplies out to 1M / 100M / 1B pairs, measured here.

    python benchmarks/scaling_costs.py [--config configs/quickstart.yaml] [--threads 2]
                                       [--encode-images 64] [--encode-texts 512] [--loss-batches 1024 2048 4096 8192]
                                       [--json scaling_costs.json]

1. Cache bytes per item, per modality, as the feature cache stores them: read from the config's
   cache on disk (filled first if needed) -- token sequences, pooled vector, and the rest (key,
   length, safetensors header), from the shard headers and file sizes.
2. Embedding bytes per item at each Matryoshka dim (what an embedding store / index holds):
   dim x 2 bytes (float16) or 4 (float32).
3. Encode seconds per item per modality on this machine (CPU, frozen encoder as the cache runs
   it: decode + preprocess + forward, batch 32; weights load and a warm-up batch excluded), and
   the prepare step alone (decode + preprocess / tokenize), the part that stays on the CPU.
4. All-gather bytes per sample of the alignment loss: counted by wrapping the ``gather`` that
   tasks/alignment.contrastive_loss calls (every tensor it gathers, its dtype and width), on a
   real batch of cached features through the config's heads.
5. Peak memory of the loss forward + backward at a few global batch sizes (CPU RSS high-water
   mark above the baseline), to check the B^2 model SCALING.md extrapolates to 32k.
6. The O(N) metadata a run keeps in RAM besides features: Python objects per sample and per
   cache-index key (tracemalloc), and the table's integers per item.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cache_bytes(cache_dirs: dict[str, Path], dtype: str) -> dict[str, dict[str, float]]:
    from edge_glass.features.cache import read_shard_header

    out = {}
    for m, d in cache_dirs.items():
        items = tokens = pooled = total = tok_rows = 0
        width = None
        for shard in sorted(d.glob("shard-*.safetensors")):
            header, meta = read_shard_header(shard)
            if meta.get("dtype") != dtype:
                continue
            items += header.rows()
            t, p = header.tensors["tokens"], header.tensors["pooled"]
            tokens += t[3] - t[2]
            pooled += p[3] - p[2]
            tok_rows += t[1][0]
            width = (t[1][1], p[1][1], str(t[0]).replace("torch.", ""))
            total += shard.stat().st_size
        out[m] = {"items": items, "token_dim": width[0], "pooled_dim": width[1], "dtype": width[2],
                  "tokens_per_item": tok_rows / items, "token_bytes": tokens / items, "pooled_bytes": pooled / items,
                  "other_bytes": (total - tokens - pooled) / items, "total_bytes": total / items}
    return out


def encode_seconds(cfg, samples, n_images: int, n_texts: int, threads: int) -> dict[str, dict[str, float]]:
    """Per item: ``prepare`` (decode + preprocess / tokenize: CPU work whatever device encodes)
    and the whole ``encode`` (prepare + collate + forward), batch 32."""
    from edge_glass.tasks.alignment import build_run_encoders

    torch.set_num_threads(threads)
    encoders = build_run_encoders(cfg)
    inputs = {"image": list(dict.fromkeys(s.image for s in samples))[:n_images],
              "text": list(dict.fromkeys(s.text for s in samples))[:n_texts]}
    out = {}
    for m, items in inputs.items():
        enc = encoders[m].ensure_loaded()
        bs = 32
        enc.encode(items[:bs])  # warm-up
        t0 = time.perf_counter()
        for item in items:
            enc.prepare(item)
        prepare = (time.perf_counter() - t0) / len(items)
        t0 = time.perf_counter()
        for s in range(0, len(items), bs):
            enc.encode(items[s : s + bs])
        out[m] = {"items": len(items), "prepare_s": prepare, "encode_s": (time.perf_counter() - t0) / len(items)}
    return out


def metadata_bytes(cfg, encoders, root: Path) -> dict[str, float]:
    """Python-object memory (tracemalloc, retained) per sample of a dataset's samples, and per key
    of a FeatureCache index; the O(N) metadata a run holds besides the features."""
    import gc
    import tracemalloc

    from edge_glass.data.formats import read_dataset
    from edge_glass.data.samples import DataReport
    from edge_glass.features.cache import FeatureCache

    out = {}
    gc.collect()
    tracemalloc.start()
    samples = [s for spec in cfg.data.train for s in read_dataset(spec, DataReport())]
    gc.collect()
    out["sample_bytes"] = tracemalloc.get_traced_memory()[0] / len(samples)
    tracemalloc.stop()
    for m, enc in encoders.items():
        gc.collect()
        tracemalloc.start()
        cache = FeatureCache(root, enc, cfg.cache.dtype)
        gc.collect()
        out[f"{m}_index_bytes_per_key"] = tracemalloc.get_traced_memory()[0] / max(len(cache.index), 1)
        tracemalloc.stop()
        del cache
    out["table_bytes_per_item"] = 4 + 8 + 8 + 8  # ShardedFeatureTable: shard int32, start, length, row int64
    out["rows_bytes_per_sample_per_modality"] = 8  # PairedData.rows int64
    return out


def gather_bytes(cfg, data) -> dict[str, float]:
    """Bytes per sample that one contrastive_loss call hands to all_gather, by tensor kind."""
    import edge_glass.tasks.alignment as alignment

    task = alignment.AlignmentTask(cfg)
    core = task.build()
    counted: dict[str, int] = {}
    real = alignment.gather

    def counting(x: torch.Tensor) -> torch.Tensor:
        kind = f"{str(x.dtype).replace('torch.', '')} x {x.shape[1] if x.dim() > 1 else 1}"
        counted[kind] = counted.get(kind, 0) + x.numel() * x.element_size()
        return real(x)

    n = 256
    alignment.gather = counting
    try:
        alignment.contrastive_loss(core, core, data.batch(torch.arange(n)), alignment.dim_weights(cfg, 0), {})
    finally:
        alignment.gather = real
    return {k: v / n for k, v in sorted(counted.items())}


def loss_memory_child(config: str, b: int) -> None:
    """Print MB above the baseline RSS at the peak of the Matryoshka InfoNCE forward + backward
    (one modality pair, every dim of the config, float32 embeddings as contrastive_loss gathers
    them) at global batch ``b``: the B x B part of a step. Run in a fresh process per batch size,
    so memory freed by a smaller batch cannot hide a larger one's peak."""
    from edge_glass.config import load_config
    from edge_glass.losses import matryoshka_info_nce

    dims = sorted(load_config(config, []).model.dims, reverse=True)
    g = torch.Generator().manual_seed(b)
    ea = {d: torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_() for d in dims}
    eb = {d: torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_() for d in dims}
    keys = torch.arange(b)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    base = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    matryoshka_info_nce(ea, eb, scale, keys, keys, dict.fromkeys(dims, 1.0)).backward()
    print((status_kb("VmHWM") - base) / 1024)


def loss_memory(config: str, batches: list[int], threads: int) -> dict[int, float]:
    import subprocess
    import sys

    return {b: float(subprocess.run([sys.executable, __file__, "--config", config, "--threads", str(threads), "--loss-child", str(b)],
                                    check=True, capture_output=True, text=True).stdout.split()[-1]) for b in batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encode-images", type=int, default=64)
    ap.add_argument("--encode-texts", type=int, default=512)
    ap.add_argument("--loss-batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--json", default="scaling_costs.json")
    ap.add_argument("--loss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loss_child:
        torch.set_num_threads(args.threads)
        return loss_memory_child(args.config, args.loss_child)

    from edge_glass.config import load_config
    from edge_glass.data.samples import DataReport
    from edge_glass.features.cache import feature_cache_dir
    from edge_glass.tasks.alignment import AlignmentTask

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"train.threads={args.threads}"])
    task = AlignmentTask(cfg)
    train = task.load(DataReport(), progress=True)["train"]
    root = feature_cache_dir(cfg)
    dirs = {m: root / task.encoders[m].cache_id() for m in cfg.encoders}
    result = {"config": args.config, "dims": sorted(cfg.model.dims, reverse=True), "cache_dtype": cfg.cache.dtype,
              "cache": cache_bytes(dirs, cfg.cache.dtype)}
    result["embedding_bytes"] = {str(d): {"float16": 2 * d, "float32": 4 * d} for d in result["dims"]}
    result["gather_bytes_per_sample"] = gather_bytes(cfg, train)
    result["loss_peak_mb"] = loss_memory(args.config, args.loss_batches, args.threads)
    result["metadata"] = metadata_bytes(cfg, task.encoders, root)
    result["encode_cpu"] = encode_seconds(cfg, train.samples, args.encode_images, args.encode_texts, args.threads)
    result["threads"] = args.threads

    print(f"{args.config}: cache dtype {cfg.cache.dtype}, dims {result['dims']}\n")
    print("| modality | items | tokens / item | token bytes | pooled bytes | other bytes | total bytes / item |")
    print("|---|---|---|---|---|---|---|")
    for m, c in result["cache"].items():
        print(f"| {m} ({c['tokens_per_item']:.1f} x {c['token_dim']} {c['dtype']} tokens, {c['pooled_dim']}-d pooled) | {c['items']} | "
              f"{c['tokens_per_item']:.2f} | {c['token_bytes']:.0f} | {c['pooled_bytes']:.0f} | {c['other_bytes']:.1f} | {c['total_bytes']:.0f} |")
    print("\n| Matryoshka dim | float16 bytes / item | float32 bytes / item |\n|---|---|---|")
    for d, b in result["embedding_bytes"].items():
        print(f"| {d} | {b['float16']} | {b['float32']} |")
    g = result["gather_bytes_per_sample"]
    print("\nall_gather payload per sample (contrastive_loss, every modality x every dim):")
    for k, v in g.items():
        print(f"  {k:>14}: {v:8.1f} bytes")
    print(f"  {'total':>14}: {sum(g.values()):8.1f} bytes / sample")
    print(f"\nMatryoshka InfoNCE forward + backward, one pair, dims {result['dims']}, peak RSS above baseline (CPU, float32):")
    for b, mb in result["loss_peak_mb"].items():
        print(f"  global batch {b:>6}: {mb:8.1f} MB   ({mb * 2**20 / b**2:.1f} bytes x B^2)")
    md = result["metadata"]
    print("\nO(N) metadata in RAM (Python objects, tracemalloc):")
    for k, v in md.items():
        print(f"  {k}: {v:.0f} bytes")
    print(f"\nper item on this CPU ({args.threads} threads, fp32): prepare (image: decode + preprocess; text: ~0, it tokenizes in collate) and whole encode")
    for m, e in result["encode_cpu"].items():
        print(f"  {m} ({e['items']} items): prepare {e['prepare_s'] * 1000:.2f} ms, encode {e['encode_s'] * 1000:.2f} ms "
              f"({1 / e['encode_s']:.1f} items/s)")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
