"""Train one config over several seeds and report mean ± std (sample std) of its test metrics.

    python benchmarks/seeds.py configs/trm_easy_vqa.yaml --seeds 0 1 2 --out runs/seeds/trm_easy_vqa
    python benchmarks/seeds.py configs/trm_vlm_qa.yaml --seeds 0 1 2 --out runs/seeds/vqa_aligned \
        --set vision.aligned_run=runs/qs --set projector.pool=none

Each seed trains into OUT/seed-N with ``--set seed=N`` (seeds already finished are reused, so
an interrupted sweep continues); the summary (per-seed values, mean, std, train seconds, sec
per step) goes to OUT/seeds.json and a one-line table to stdout. Metrics: exact_match and f1
for vlm runs, R@1 of every direction at the largest dim for alignment runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def metrics_of(result: dict) -> dict[str, float]:
    if "exact_match" in result:
        return {"EM": result["exact_match"], "F1": result["f1"]}
    return {f"{k} R@1": v["R@1"] for k, v in result.items() if "_to_" in k and isinstance(v, dict)}


def step_time(run: Path) -> float:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [line["sec_per_step"] for line in lines if line.get("kind") == "train" and "sec_per_step" in line]
    return statistics.median(times) if times else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--label", help="row label (default: OUT's name)")
    args = ap.parse_args()
    out = Path(args.out)
    per_seed = {}
    for seed in args.seeds:
        run = out / f"seed-{seed}"
        if not (run / "eval.json").is_file():
            sets = [x for s in [f"seed={seed}", *args.overrides] for x in ("--set", s)]
            resume = ["--resume"] if (run / "config.yaml").is_file() else []
            subprocess.run([sys.executable, "-m", "edge_glass.cli", "train", args.config, "--out", str(run), "--no-progress", *sets, *resume], check=True)
        summary = json.loads((run / "summary.json").read_text())
        per_seed[seed] = {**metrics_of(json.loads((run / "eval.json").read_text())), "train_seconds": summary["train_seconds"],
                          "selected_step": summary["selected_step"], "sec_per_step": step_time(run)}
    names = [k for k in per_seed[args.seeds[0]] if k not in ("train_seconds", "selected_step", "sec_per_step")]
    stats = {k: mean_std([v[k] for v in per_seed.values()]) for k in [*names, "train_seconds", "sec_per_step"]}
    record = {"config": args.config, "overrides": args.overrides, "seeds": per_seed,
              "mean": {k: round(m, 4) for k, (m, _) in stats.items()}, "std": {k: round(s, 4) for k, (_, s) in stats.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(record, indent=2))
    label = args.label or out.name
    cells = [f"{k} {stats[k][0]:.2f} ± {stats[k][1]:.2f} (min {min(v[k] for v in per_seed.values()):.2f})" for k in names]
    print(f"{label}: " + ", ".join(cells) + f"; {len(per_seed)} seeds; train {stats['train_seconds'][0]:.0f} s, "
          f"{stats['sec_per_step'][0]:.3f} s/step")


if __name__ == "__main__":
    main()
