"""Cold-cache encoding phase of a config with the frozen encoders on PyTorch vs ONNX Runtime
(``encoders.<m>.backend``), and the Recall@K each run reaches.

    python benchmarks/encoding_backend.py configs/quickstart.yaml --out runs/backend --threads 2

Three runs, each with an empty feature cache: torch; onnxruntime with no exported graph yet
(includes the one-time export of each backbone); onnxruntime with the graphs already exported
(what every later cold cache on the machine costs). ``data_seconds`` (summary.json) is the data
phase: reading, decoding and encoding every input into the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def train(config: str, out: Path, cache: Path, sets: list[str]) -> dict:
    env = {**os.environ, "EDGE_GLASS_CACHE": str(cache)}
    args = [x for s in sets for x in ("--set", s)]
    subprocess.run([sys.executable, "-m", "edge_glass.cli", "train", config, "--out", str(out), "--no-progress", *args],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    result = json.loads((out / "eval.json").read_text())
    r1 = {k: v["R@1"] for k, v in result.items() if isinstance(v, dict) and "R@1" in v}
    return {"data_seconds": summary["data_seconds"], "train_seconds": summary["train_seconds"], "R@1": r1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modalities = list(yaml.safe_load(Path(args.config).read_text())["encoders"])
    base = [f"train.threads={args.threads}"]
    ort = [f"encoders.{m}.backend=onnxruntime" for m in modalities]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows["torch"] = train(args.config, out / "torch", tmp / "c1", base)
        rows["onnxruntime, graphs exported in the run"] = train(args.config, out / "ort_first", tmp / "c2", base + ort)
        (tmp / "c3").mkdir()
        shutil.copytree(tmp / "c2" / "onnx", tmp / "c3" / "onnx")  # graphs only: the feature cache is empty again
        rows["onnxruntime, graphs already exported"] = train(args.config, out / "ort_warm", tmp / "c3", base + ort)
    ref = rows["torch"]["data_seconds"]
    print(f"{args.config}, {args.threads} threads, empty feature cache each run")
    print("| encoders | data phase s | speed-up | R@1 (largest dim) |\n|---|---|---|---|")
    for name, r in rows.items():
        r1 = ", ".join(f"{k} {v:.2f}" for k, v in r["R@1"].items())
        print(f"| {name} | {r['data_seconds']:.1f} | {ref / r['data_seconds']:.2f}x | {r1} |")
    (out / "encoding_backend.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
