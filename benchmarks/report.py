"""Markdown tables for BENCHMARKS.md from the JSON that runs write.

    python benchmarks/report.py runs/mrl_ablation/ablation.json            # an ablation: one row per variant
    python benchmarks/report.py runs/bench/trimodal_heldout.json --dims    # one eval, every Matryoshka dim
    python benchmarks/report.py runs/decoder_ablation/ablation.json        # QA metrics (exact match, F1)

Retrieval results give R@1/R@5/R@10 per direction (at the largest dim, or every dim with --dims);
QA results give exact match, F1 and the majority-answer baseline; spoken-digit results (closed set) give
accuracy overall and per speaker.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KS = ("R@1", "R@5", "R@10")


def _short(direction: str) -> str:
    return "→".join(side.replace("image", "img").replace("audio", "aud").replace("text", "txt") for side in direction.split("_to_"))


def retrieval_rows(name: str, result: dict, every_dim: bool) -> tuple[list[str], list[list[str]]]:
    directions = [k for k, v in result.items() if "_to_" in k and isinstance(v, dict)]
    header = ["run", "dim"] + [f"{_short(d)} {k}" for d in directions for k in KS]
    dims = result.get("dims", {})
    if every_dim and dims:
        blocks = dims
    else:  # the top-level blocks are those of the largest dim
        blocks = {str(max(map(int, dims))) if dims else "full": result}
    rows = [[name, dim] + [f"{block[d][k]:.1f}" if d in block else "" for d in directions for k in KS]
            for dim, block in blocks.items()]
    return header, rows


def qa_rows(name: str, result: dict) -> tuple[list[str], list[list[str]]]:
    header = ["run", "exact match", "F1", "n", "majority baseline", "trainable params"]
    row = [name, f"{result['exact_match']:.2f}", f"{result['f1']:.2f}", str(result.get("n", "")),
           f"{result['majority_exact_match']:.2f}" if "majority_exact_match" in result else "",
           f"{result['trainable_parameters']:,}" if "trainable_parameters" in result else ""]
    return header, [row]


def rows_for(name: str, result: dict, every_dim: bool) -> tuple[list[str], list[list[str]]]:
    if "exact_match" in result:
        return qa_rows(name, result)
    return retrieval_rows(name, result, every_dim)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="ablation.json (variants) or an eval JSON")
    ap.add_argument("--dims", action="store_true", help="a row per Matryoshka dim")
    args = ap.parse_args()
    header, rows = None, []
    for file in args.files:
        data = json.loads(Path(file).read_text())
        runs = data if Path(file).name == "ablation.json" else {Path(file).stem: data}
        for name, result in runs.items():
            h, r = rows_for(name, result, args.dims)
            if header is not None and h != header:
                print(markdown(header, rows) + "\n")
                rows = []
            header = h
            rows += r
            if "digits" in result:
                z = result["digits"]
                print(f"{name}: spoken digits (closed set) {z['accuracy']:.2f}% of {z['n']} (chance {z['chance']:.0f}%); "
                      + ", ".join(f"{k} {v:.1f}" for k, v in z["per_speaker"].items()))
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
