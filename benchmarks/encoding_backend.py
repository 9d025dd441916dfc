"""Cold-cache encoding phase of a config with the frozen encoders on PyTorch vs ONNX Runtime
(``encoders.<m>.backend``), and the Recall@K each run reaches.

    python benchmarks/encoding_backend.py configs/quickstart.yaml --out runs/backend --threads 2 --repeats 3
    git worktree add ../eg_before_14 0fb5072   # the code before issue 14, as the baseline row
    python benchmarks/encoding_backend.py configs/quickstart.yaml --out runs/backend --threads 2 --repeats 3 --baseline-code ../eg_before_14

Each run trains with an empty feature cache: torch; onnxruntime with no exported graph yet
(includes the one-time export of each backbone); onnxruntime with the graphs already exported
(what every later cold cache on the machine costs); with ``--baseline-code DIR``, first the same
torch run on another checkout of Edge Glass (run from DIR, same interpreter and packages).
``data_seconds`` (summary.json) is the data phase: reading, decoding and encoding every input
into the cache. ``--repeats N`` runs every row N times (interleaved) and reports the median.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from edge_glass.paths import data_root


def train(config: str, out: Path, cache: Path, sets: list[str], code: str | None = None) -> dict:
    env = {**os.environ, "EDGE_GLASS_CACHE": str(cache)}
    if code:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code).resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["EDGE_GLASS_DATA"] = str(data_root())  # the data this checkout reads, wherever the other one sits
    args = [x for s in sets for x in ("--set", s)]
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "edge_glass.cli", "train", str(Path(config).resolve()), "--out", str(out.resolve()),
                    "--no-progress", *args], check=True, env=env, stdout=subprocess.DEVNULL, cwd=code)  # -m puts cwd first on sys.path
    summary = json.loads((out / "summary.json").read_text())
    result = json.loads((out / "eval.json").read_text())
    r1 = {k: v["R@1"] for k, v in result.items() if isinstance(v, dict) and "R@1" in v}
    return {"data_seconds": summary["data_seconds"], "train_seconds": summary["train_seconds"], "R@1": r1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline-code", help="another checkout of Edge Glass: its torch run is the reference row")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modalities = list(yaml.safe_load(Path(args.config).read_text())["encoders"])
    base = [f"train.threads={args.threads}"]
    ort = [f"encoders.{m}.backend=onnxruntime" for m in modalities]
    runs: dict[str, list[dict]] = {}
    names = {"baseline": f"torch, code at {args.baseline_code}", "torch": "torch", "ort_first": "onnxruntime, graphs exported in the run",
             "ort_warm": "onnxruntime, graphs already exported"}
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if args.baseline_code:
                runs.setdefault("baseline", []).append(train(args.config, out / "baseline", tmp / "c0", base, args.baseline_code))
            runs.setdefault("torch", []).append(train(args.config, out / "torch", tmp / "c1", base))
            runs.setdefault("ort_first", []).append(train(args.config, out / "ort_first", tmp / "c2", base + ort))
            (tmp / "c3").mkdir()
            shutil.copytree(tmp / "c2" / "onnx", tmp / "c3" / "onnx")  # graphs only: the feature cache is empty again
            runs.setdefault("ort_warm", []).append(train(args.config, out / "ort_warm", tmp / "c3", base + ort))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]['data_seconds']:.1f} s" for k, v in runs.items()), flush=True)
    median = {k: statistics.median(r["data_seconds"] for r in v) for k, v in runs.items()}
    print(f"{args.config}, {args.threads} threads, empty feature cache each run, median of {args.repeats}")
    refs = ["baseline", "torch"] if args.baseline_code else ["torch"]
    head = " | ".join(f"vs {names[r]}" for r in refs)
    print(f"| encoders | data phase s (each run) | {head} | R@1 (largest dim) |\n|---|---|" + "---|" * len(refs) + "---|")
    for key, rows in runs.items():
        each = ", ".join(f"{r['data_seconds']:.1f}" for r in rows)
        speed = " | ".join(f"{median[r] / median[key]:.2f}x" for r in refs)
        r1 = ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["R@1"].items())
        print(f"| {names[key]} | {median[key]:.1f} ({each}) | {speed} | {r1} |")
    (out / "encoding_backend.json").write_text(json.dumps({"median_data_seconds": median, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
