"""Frozen-encoder throughput, fp32 vs bf16 autocast, on real coco1k images and captions.

    python benchmarks/encode_throughput.py [--images 256] [--texts 1024] [--threads 2]

Prints items/s per encoder and precision (weights load and one warm-up batch excluded) and the
cosine similarity of bf16 to fp32 pooled outputs.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from edge_glass.encoders.efficientnet import EfficientNetLiteConfig, EfficientNetLiteEncoder
from edge_glass.encoders.text import SentenceTransformerConfig, SentenceTransformerEncoder
from edge_glass.paths import data_root


def throughput(encoder, items, batch_size: int) -> tuple[float, torch.Tensor]:
    encoder.ensure_loaded()
    encoder.encode(items[:batch_size])  # warm-up
    start, pooled = time.perf_counter(), []
    for s in range(0, len(items), batch_size):
        pooled.append(encoder.encode(items[s : s + batch_size]).pooled)
    return len(items) / (time.perf_counter() - start), torch.cat(pooled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root() / "coco1k"
    images = [str(p) for p in sorted((root / "images").iterdir())[: args.images]]
    texts = [a["caption"].strip() for a in json.loads((root / "captions.json").read_text())["annotations"][: args.texts]]
    rows = []
    for name, make, items in [
        ("efficientnet-lite0 (images)", lambda p: EfficientNetLiteEncoder(EfficientNetLiteConfig(autocast=p)), images),
        ("all-MiniLM-L6-v2 (texts)", lambda p: SentenceTransformerEncoder(SentenceTransformerConfig(autocast=p)), texts),
    ]:
        fp32_rate, fp32 = throughput(make("fp32"), items, 32)
        bf16_rate, bf16 = throughput(make("bf16"), items, 32)
        cos = torch.nn.functional.cosine_similarity(fp32, bf16).mean().item()
        rows.append((name, len(items), fp32_rate, bf16_rate, cos))
    print(f"torch {torch.__version__}, {args.threads} threads, batch 32")
    print(f"{'encoder':<30}{'items':>7}{'fp32 /s':>10}{'bf16 /s':>10}{'speed-up':>10}{'cos(bf16,fp32)':>16}")
    for name, n, a, b, cos in rows:
        print(f"{name:<30}{n:>7}{a:>10.1f}{b:>10.1f}{b / a:>9.2f}x{cos:>16.4f}")


if __name__ == "__main__":
    main()
