"""Sections every run gets: training curves (metrics.jsonl), resolved config, data report,
parameter counts and the wall time of each phase."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..runs import RunDir
from .figures import FigureWriter, new_figure, styled
from .html import Cell, Section, esc, table

SCORE_LABELS = {"alignment": "R@1 (%)", "vlm": "EM, F1 and their sum (%)"}
SCORE_NAMES = {"alignment": "score = mean R@1 over directions", "vlm": "score = exact match + F1"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl lines (blank or torn lines skipped); [] when the file is missing."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "step" in obj:
            out.append(obj)
    return out


def series(lines: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for line in lines:
        v = line.get(key)
        if line.get("kind") == kind and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(line["step"])
            ys.append(float(v))
    return xs, ys


def val_directions(lines: list[dict[str, Any]]) -> list[str]:
    """Retrieval directions logged in validation lines (top-level blocks: the largest dim)."""
    seen: dict[str, None] = {}
    for line in lines:
        if line.get("kind") == "val":
            seen.update((k, None) for k, v in line.items() if "_to_" in k and isinstance(v, dict) and "R@1" in v)
    return list(seen)


@styled
def training_curves_figure(lines: list[dict[str, Any]], task: str, selected_step: int | None = None):
    """Loss, learning rate, temperature(s), validation score, and the extra numbers the task logs
    (per-step TRM losses, gradient norm) against the optimizer step. None without train lines."""
    train = [ln for ln in lines if ln.get("kind") == "train"]
    if not train:
        return None
    panels: list[tuple[str, str, list[tuple[str, list[int], list[float]]], bool]] = []  # title, ylabel, curves, log-y
    curves = [("loss (mean over logged steps)", *series(lines, "train", "loss"))]
    ce = sorted({k for ln in train for k in ln if k.startswith("ce_step")})
    curves += [(f"answer cross-entropy, supervision {k[7:]}", *series(lines, "train", k)) for k in ce]
    panels.append(("training loss", "loss", curves, False))
    panels.append(("learning rate", "learning rate", [("lr", *series(lines, "train", "lr"))], False))
    temps = sorted({k for ln in train if isinstance(ln.get("temperature"), dict) for k in ln["temperature"]})
    if temps:
        tcurves = []
        for t in temps:
            xs = [ln["step"] for ln in train if isinstance(ln.get("temperature"), dict) and t in ln["temperature"]]
            ys = [float(ln["temperature"][t]) for ln in train if isinstance(ln.get("temperature"), dict) and t in ln["temperature"]]
            tcurves.append((t.replace("__", "-"), xs, ys))
        panels.append(("contrastive temperature per modality pair", "temperature \u03c4", tcurves, False))
    vcurves = [(SCORE_NAMES.get(task, "score"), *series(lines, "val", "score"))]
    if task == "alignment":
        for d in val_directions(lines):
            xs = [ln["step"] for ln in lines if ln.get("kind") == "val" and isinstance(ln.get(d), dict)]
            vcurves.append((f"R@1 {d.replace('_to_', ' to ')}", xs, [float(ln[d]["R@1"]) for ln in lines if ln.get("kind") == "val" and isinstance(ln.get(d), dict)]))
    else:
        vcurves += [("exact match", *series(lines, "val", "exact_match")), ("F1", *series(lines, "val", "f1"))]
    if vcurves[0][1]:
        panels.append(("validation", SCORE_LABELS.get(task, "score"), vcurves, False))
    gn = series(lines, "train", "grad_norm")
    if gn[0]:
        panels.append(("gradient norm (before clipping)", "L2 norm", [("grad norm", *gn)], False))
    halt = sorted({k for ln in train for k in ln if k.startswith("halt_acc_step")})
    if halt:
        panels.append(("TRM halting head accuracy", "accuracy (fraction)", [(f"supervision {k[13:]}", *series(lines, "train", k)) for k in halt], False))
    ncols = 3 if len(panels) > 4 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(4.4 * ncols, 3.1 * nrows, nrows, ncols)
    flat = [a for row in axes for a in row]
    for ax, (title, ylabel, cs, logy) in zip(flat, panels):
        for label, xs, ys in cs:
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, linewidth=1.4)
        if selected_step and title == "validation":
            ax.axvline(selected_step, color="grey", linestyle="--", linewidth=1, label=f"selected step {selected_step}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(cs) > 1 or (selected_step and title == "validation"):
            ax.legend(loc="best")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    return fig


def training_section(run: RunDir, task: str, writer: FigureWriter) -> Section:
    sec = Section("Training", "training")
    lines = read_metrics(run.file("metrics.jsonl"))
    summary = _read(run.file("summary.json")) or {}
    fig = training_curves_figure(lines, task, summary.get("selected_step"))
    if fig is None:
        return sec.note(f"{run.file('metrics.jsonl')}: no training lines to plot")
    n_train = sum(1 for ln in lines if ln.get("kind") == "train")
    n_val = sum(1 for ln in lines if ln.get("kind") == "val")
    sec.add(writer.save(fig, "training_curves", f"Training curves from metrics.jsonl ({n_train} train lines, {n_val} validation lines); "
                        "the training loss is the mean over the steps since the previous line."))
    return sec


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def config_section(run: RunDir) -> Section:
    sec = Section("Resolved config", "config")
    text = run.file("config.yaml").read_text(encoding="utf-8")
    return sec.para(f"{run.file('config.yaml')}: loads without the original YAML (edge-glass train {run.file('config.yaml')} reproduces the run).").add(
        f"<pre>{esc(text)}</pre>")


def data_section(run: RunDir, eval_skipped: dict[str, list[dict[str, Any]]]) -> Section:
    """Training data (data_report.json) and the report's own evaluation sets: read, kept, skipped (named)."""
    sec = Section("Data", "data")
    rep = _read(run.file("data_report.json"))
    if rep:
        specs = list(dict.fromkeys([*rep.get("read", {}), *rep.get("kept", {})]))
        sec.h3("Training run (data_report.json)")
        sec.add(table(["dataset / split", "read", "kept"], [[s, rep.get("read", {}).get(s, ""), rep.get("kept", {}).get(s, "")] for s in specs]))
        sec.add(skipped_html(rep.get("skipped", []), rep.get("skipped_by_reason", {})))
    else:
        sec.note(f"{run.file('data_report.json')} is missing")
    for label, skipped in eval_skipped.items():
        sec.h3(f"Evaluation on {label}")
        sec.add(skipped_html(skipped, None))
    return sec


def skipped_html(skipped: list[dict[str, Any]], by_reason: dict[str, int] | None, limit: int = 50) -> str:
    if not skipped:
        return "<p>No sample skipped.</p>"
    parts = []
    if by_reason:
        parts.append(table(["reason", "samples"], sorted(by_reason.items(), key=lambda kv: -kv[1])))
    rows = [[s.get("source", ""), s.get("reason", ""), s.get("input", "")] for s in skipped[:limit]]
    more = f" (the first {limit} of {len(skipped)})" if len(skipped) > limit else ""
    parts.append(f"<details open><summary>{len(skipped)} skipped samples{more}</summary>{table(['source', 'reason', 'input'], rows)}</details>")
    return "".join(parts)


def parameters_section(rows: list[tuple[str, int, int]]) -> Section:
    sec = Section("Parameters", "parameters")
    body = [[name, Cell(total), Cell(trainable)] for name, total, trainable in rows]
    body.append([Cell("<b>all</b>", raw_html=True), Cell(sum(r[1] for r in rows)), Cell(sum(r[2] for r in rows))])
    return sec.add(table(["module", "parameters", "trainable"], body))


def timing_section(run: RunDir, report_phases: dict[str, float]) -> Section:
    sec = Section("Wall time", "time")
    summary = _read(run.file("summary.json"))
    if summary:
        data_s, train_s, total_s = summary.get("data_seconds"), summary.get("train_seconds"), summary.get("total_seconds")
        rows = [["reading data + feature cache (encoding on a cold cache)", Cell(data_s)], ["training loop (steps, validation, checkpoints)", Cell(train_s)]]
        if all(isinstance(x, (int, float)) for x in (data_s, train_s, total_s)):
            rows.append(["final evaluation + saving", Cell(round(total_s - data_s - train_s, 2))])
        rows.append([Cell("<b>training run, total</b>", raw_html=True), Cell(total_s)])
        sec.h3("Training (summary.json)")
        sec.add(table(["phase", "seconds"], rows))
        sec.para(f"{summary.get('steps', '?')} steps ({summary.get('steps_per_epoch', '?')} per epoch) on {summary.get('processes', 1)} process(es); "
                 f"weights of step {summary.get('selected_step', '?')} kept.")
    else:
        sec.note(f"{run.file('summary.json')} is missing (training did not finish?)")
    sec.h3("This report")
    rows = [[name, Cell(round(s, 2))] for name, s in report_phases.items()]
    rows.append([Cell("<b>report, total</b>", raw_html=True), Cell(round(sum(report_phases.values()), 2))])
    return sec.add(table(["phase", "seconds"], rows))
