"""The report's figures one at a time, for notebooks and scripts: each returns a matplotlib Figure
(shown inline by Jupyter) drawn by the same code as report.html.

    from edge_glass.report import views
    views.training_curves("runs/qs")
    space, ev = views.embedding_space(edge_glass.load("runs/qs"))     # evaluated as edge-glass eval does
    views.recall_curves(ev.result, ev.label); views.tsne(space); views.modality_gap(space)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runs import RunDir
from . import ablation, alignment, common, vlm
from .build import EvalSet, evaluate


def training_curves(run_dir: str | Path):
    """Loss, learning rate, temperature, validation score... of a run against the step."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    summary = common._read(run.file("summary.json")) or {}
    return common.training_curves_figure(common.read_metrics(run.file("metrics.jsonl")), cfg.task, summary.get("selected_step"))


def evaluation(model: Any, spec: str | None = None, progress: bool = False) -> EvalSet:
    """A loaded run evaluated as ``edge-glass eval`` does (result), plus what the figures need (details)."""
    return evaluate(model, spec, progress)


def recall_curves(result: dict[str, Any], label: str = "the test split"):
    return alignment.recall_curves_figure(result, label)


def embedding_space(model: Any, spec: str | None = None, progress: bool = False) -> tuple[alignment.Space, EvalSet]:
    """Every evaluated item of an alignment run embedded at every dim, and the evaluation."""
    ev = evaluate(model, spec, progress)
    return alignment.Space.build(model, ev.details["data"], model.cfg.eval.batch_size, progress), ev


def tsne(space: alignment.Space, points: int = 800, seed: int = 0):
    return alignment.tsne_figure(space, points, seed=seed)[0]


def modality_gap(space: alignment.Space, seed: int = 0):
    return alignment.gap_figure(space, space.dims[0], seed)


def modality_gap_table(space: alignment.Space) -> list[dict[str, Any]]:
    """Per modality pair and dim: centroid distance, mean matched and unmatched cosine."""
    return [{"pair": f"{a}-{b}", "dim": d, **alignment.gap_stats(space, a, b, d)} for a, b in space.pairs() for d in space.dims]


def similarity_heatmap(space: alignment.Space, rows: str = "text", cols: str = "image", n: int = 10, seed: int = 0):
    return alignment.heatmap_figure(space, rows, cols, n, seed)


def digits(result_digits: dict[str, Any]):
    """Spoken-digit accuracy per digit, per speaker and against the dim (an FSDD evaluation's "digits")."""
    return alignment.digits_figure(result_digits)


def predictions_html(predictions: list[dict[str, Any]], n: int = 12, seed: int = 0) -> str:
    """Sample predictions with their images as HTML cards (IPython.display.HTML shows them)."""
    from .html import CSS

    cards = "\n".join(line for line in CSS.splitlines() if ".card" in line or "-text" in line or line.startswith(":root"))
    return f"<style>{cards}</style>" + vlm.prediction_cards(predictions, n, seed, 96)


def qa_breakdown(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exact match / F1 per answer type and per question template (or question type)."""
    out = [{"by": "answer type", "group": g, **m} for g, m in vlm.grouped_metrics(predictions, vlm.answer_types(predictions))]
    what, groups = vlm.question_groups(predictions)
    return out + [{"by": what, "group": g, **m} for g, m in vlm.grouped_metrics(predictions, groups)]


def qa_per_type(predictions: list[dict[str, Any]]):
    return vlm.grouped_figure(vlm.grouped_metrics(predictions, vlm.answer_types(predictions)), "answer type")


def confusion_matrix(predictions: list[dict[str, Any]]):
    """None unless the reference answers form a closed set (at most 20 short answers)."""
    labels = vlm.closed_set(predictions)
    return vlm.confusion_figure(predictions, labels) if labels else None


def halting_steps(predictions: list[dict[str, Any]], n_sup: int | None = None):
    return vlm.halting_figure(predictions, n_sup)


def compare(results: dict[str, dict[str, Any]]):
    """One comparison figure of several runs' evaluations ({name: eval result}), as for ablations."""
    return ablation.qa_comparison_figure(results) if ablation.is_qa(results) else ablation.retrieval_comparison_figure(results)


def report_figures(html: str | Path) -> list[Path]:
    """The PNG figures a report wrote beside its report.html, in page order."""
    html = Path(html)
    page = html.read_text(encoding="utf-8")
    pngs = {p.stem: p for p in (html.parent / "figures").glob("*.png")}
    return sorted(pngs.values(), key=lambda p: page.find(f'data-figure="{p.stem}"'))
