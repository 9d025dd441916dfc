"""Ablations (a directory with ablation.json and one run per variant): one comparison figure and
table across the variants, and their validation curves side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .alignment import directions_of, ks_of
from .common import SCORE_NAMES, read_metrics, series
from .figures import FigureWriter, new_figure, pretty_direction, styled
from .html import Cell, Section, table


def is_qa(results: dict[str, Any]) -> bool:
    return any(isinstance(r, dict) and "exact_match" in r for r in results.values())


@styled
def qa_comparison_figure(results: dict[str, dict[str, Any]]):
    names = [n for n, r in results.items() if r]
    y = np.arange(len(names))
    fig, axes = new_figure(10, max(2.4, 0.42 * len(names) + 1.4))
    ax = axes[0][0]
    ax.barh(y - 0.2, [results[n]["exact_match"] for n in names], height=0.4, label="exact match", color="#1f77b4")
    ax.barh(y + 0.2, [results[n]["f1"] for n in names], height=0.4, label="F1", color="#ff7f0e")
    majority = [results[n].get("majority_exact_match") for n in names if results[n].get("majority_exact_match") is not None]
    if majority:
        ax.axvline(majority[0], color="grey", linestyle="--", label=f"majority-answer baseline {majority[0]:.1f}%")
    ax.set_yticks(y, [f"{n} ({results[n].get('trainable_parameters', 0):,} params)" if results[n].get("trainable_parameters") else n for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("score on the test split (%)")
    ax.set_title("variants: exact match and F1")
    ax.legend(loc="lower right")
    return fig


@styled
def retrieval_comparison_figure(results: dict[str, dict[str, Any]]):
    names = [n for n, r in results.items() if r and r.get("dims")]
    dirs = list(dict.fromkeys(d for n in names for d in directions_of(results[n])))
    fig, axes = new_figure(13, max(3.2, 0.42 * len(names) * max(1, len(dirs)) / 2 + 1.6), 1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0][0]
    y = np.arange(len(names))
    h = 0.8 / max(len(dirs), 1)
    for k, d in enumerate(dirs):
        ax.barh(y - 0.4 + h * (k + 0.5), [results[n].get(d, {}).get("R@1", np.nan) for n in names], height=h, label=pretty_direction(d))
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("R@1 at the largest dim (%)")
    ax.set_title("variants: R@1 per retrieval direction")
    ax.legend(loc="lower right")
    ax = axes[0][1]
    for n in names:
        dims = sorted(int(d) for d in results[n]["dims"])
        mean = [np.mean([b["R@1"] for b in results[n]["dims"][str(d)].values()]) for d in dims]
        ax.plot(dims, mean, marker="o", label=n)
    ax.set_xscale("log", base=2)
    all_dims = sorted({int(d) for n in names for d in results[n]["dims"]})
    ax.set_xticks(all_dims, [str(d) for d in all_dims])
    ax.minorticks_off()
    ax.set_xlabel("Matryoshka embedding dim")
    ax.set_ylabel("mean R@1 over directions (%)")
    ax.set_title("variants: R@1 vs dim")
    ax.legend(loc="best", fontsize=8)
    return fig


@styled
def validation_curves_figure(root: Path, names: list[str], task: str):
    fig, axes = new_figure(9, 3.6)
    ax = axes[0][0]
    drawn = 0
    for n in names:
        xs, ys = series(read_metrics(root / n / "metrics.jsonl"), "val", "score")
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=n)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation score (%)")
    ax.set_title(f"validation score of each variant ({SCORE_NAMES.get(task, 'score')})")
    ax.legend(loc="best", fontsize=8, ncol=2 if drawn > 6 else 1)
    return fig


def _seconds(root: Path, name: str) -> Any:
    import json

    try:
        return json.loads((root / name / "summary.json").read_text()).get("total_seconds", "")
    except (OSError, ValueError):
        return ""


def ablation_sections(root: Path, results: dict[str, Any], writer: FigureWriter) -> list[Section]:
    sec = Section("Variants compared", "ablation")
    ok = {n: r for n, r in results.items() if isinstance(r, dict) and r}
    missing = [n for n in results if n not in ok]
    if missing:
        sec.note(f"no result for {', '.join(missing)} (training failed or was interrupted)")
    qa = is_qa(ok)
    if qa:
        sec.add(writer.save(qa_comparison_figure(ok), "ablation_comparison", "Exact match and F1 of each variant on its test split (ablation.json)."))
        rows = [[n, Cell(r["exact_match"], key=f"{n}/exact_match", file="ablation.json"), Cell(r["f1"], key=f"{n}/f1", file="ablation.json"),
                 Cell(r.get("n", "")), Cell(r.get("distinct_answers", "")), Cell(r.get("majority_exact_match", "")),
                 Cell(r.get("trainable_parameters", "")), Cell(_seconds(root, n))] for n, r in ok.items()]
        sec.add(table(["variant", "exact match (%)", "F1 (%)", "questions", "distinct answers", "majority baseline (%)", "trainable parameters",
                       "train time (s)"], rows))
    else:
        sec.add(writer.save(retrieval_comparison_figure(ok), "ablation_comparison",
                            "Recall@1 of each variant on its test split (ablation.json): per direction at the largest dim, and its mean against the dim."))
        dirs = list(dict.fromkeys(d for r in ok.values() for d in directions_of(r)))
        ks = next((ks_of(r) for r in ok.values() if ks_of(r)), ["R@1", "R@5", "R@10"])
        rows = []
        for n, r in ok.items():
            top = str(max(int(d) for d in r["dims"]))
            rows.append([n, Cell(int(top))] + [Cell(r["dims"][top][d][k], key=f"{n}/dims/{top}/{d}/{k}", file="ablation.json") if d in r["dims"][top] else ""
                                              for d in dirs for k in ks] + [Cell(_seconds(root, n))])
        sec.add(table(["variant", "dim"] + [f"{pretty_direction(d)} {k}" for d in dirs for k in ks] + ["train time (s)"], rows))
    task = "vlm" if qa else "alignment"
    fig = validation_curves_figure(root, list(ok), task)
    if fig is not None:
        sec.add(writer.save(fig, "ablation_validation", "Validation score against the step for every variant (each variant's metrics.jsonl)."))
    sec.para("Each variant is a run directory of its own: edge-glass report " + str(root / "VARIANT") + " gives its full report.")
    return [sec]
