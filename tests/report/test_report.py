"""edge-glass report on real tiny runs: every figure loads in headless Chromium, the numbers on the
page are those of the run's eval JSON and of ``edge-glass eval``, and each task gets its figures."""
from __future__ import annotations

import json
import time
from pathlib import Path

from edge_glass.cli import main

from .page import check_page, open_page


def report(run: Path, out: Path, *extra: str) -> Path:
    assert main(["report", str(run), "--out", str(out), "--no-progress", *extra]) == 0
    return out / "report.html"


def eval_json(run: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", str(run), "--no-progress", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_alignment_report_renders_and_its_numbers_are_those_of_edge_glass_eval(aligned_run, browser, tmp_path, capsys):
    trained = json.loads((aligned_run / "eval.json").read_text())
    start = time.time()
    html = report(aligned_run, tmp_path / "rep", "--tsne-points", "60")
    seconds = time.time() - start
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "rep" / "figures").iterdir()}
    for fig in ("recall_vs_dim", "tsne", "modality_gap", "heatmap_text_image", "training_curves"):
        assert {f"{fig}.png", f"{fig}.svg"} <= names, names
    info = open_page(browser, html, tmp_path / "report.png")
    assert check_page(info, aligned_run) >= 12  # 2 dims x 2 directions x 3 K at least
    assert check_page(info, tmp_path / "rep") >= 12  # the report folder's copy says the same
    # the same numbers as `edge-glass eval` on the same data, and as training's own evaluation
    cli = eval_json(aligned_run, tmp_path / "e.json")
    assert json.loads((tmp_path / "rep" / "eval.json").read_text()) == cli
    assert {k: v for k, v in json.loads((aligned_run / "eval.json").read_text()).items() if k in trained} == trained
    text = info["text"]
    assert "60 items" in text  # t-SNE on the configured subsample
    assert text.count("first correct at rank") == 16  # 8 sample queries per direction
    assert "\u2713 correct" in text and "image \u2192 text" in text
    for section in ("Training", "Parameters", "Resolved config", "Data", "Wall time"):
        assert section in text
    assert not info["overflow"]
    assert (tmp_path / "report.png").stat().st_size > 50_000
    assert seconds < 60


def test_trm_report_has_per_type_scores_a_confusion_matrix_predictions_and_halting(trm_run, browser, tmp_path):
    html = report(trm_run, tmp_path / "rep", "--no-svg")
    names = {p.stem for p in (tmp_path / "rep" / "figures").glob("*.png")}
    assert {"qa_answer_type", "qa_question_groups", "qa_confusion", "trm_halting", "training_curves"} <= names, names
    assert not list((tmp_path / "rep" / "figures").glob("*.svg"))
    info = open_page(browser, html, tmp_path / "report.png")
    assert check_page(info, trm_run) >= 5
    cli = eval_json(trm_run, tmp_path / "e.json")
    shown = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert shown == cli
    preds = json.loads((tmp_path / "rep" / "eval_predictions.json").read_text())
    assert len(preds) == cli["n"] and all(len(p["halt_steps"]) >= 1 for p in preds)
    assert info["text"].count("reference:") == 12
    assert "question template" in info["text"] and "other: circle, rectangle, triangle" in info["text"]


def test_trimodal_report_plays_clips_and_gives_per_digit_accuracy(tri_run, browser, tmp_path):
    html = report(tri_run, tmp_path / "rep", "--no-svg", "--tsne-points", "80")
    info = open_page(browser, html, tmp_path / "report.png")
    assert check_page(info, tri_run) > 30
    fsdd = next(p for p in tri_run.iterdir() if p.name.startswith("eval_fsdd"))  # refreshed by the report
    assert "per_digit" in json.loads(fsdd.read_text())["digits"]
    assert any(key.startswith("digits/per_digit/") for _, key, _ in info["numbers"])
    assert len(info["audio"]) >= 8  # clips as queries and results, each plays (duration > 0)
    names = {p.stem for p in (tmp_path / "rep" / "figures").glob("*.png")}
    assert {"heatmap_text_image", "heatmap_text_audio", "heatmap_audio_image"} <= names and any(n.startswith("digits") for n in names)
    for direction in ("audio \u2192 image", "image \u2192 audio", "audio \u2192 text"):
        assert direction in info["text"]


def test_ablation_report_compares_the_variants(aligned_run, trm_run, browser, tmp_path):
    import shutil

    root = tmp_path / "abl"
    results = {}
    for name in ("mean_pool", "copy"):
        shutil.copytree(aligned_run, root / name, ignore=shutil.ignore_patterns("checkpoints", "report", "tensorboard"))
        results[name] = json.loads((root / name / "eval.json").read_text())
    (root / "ablation.json").write_text(json.dumps(results))
    html = report(root, tmp_path / "rep")
    assert (tmp_path / "rep" / "figures" / "ablation_comparison.png").is_file()
    info = open_page(browser, html, tmp_path / "report.png")
    assert check_page(info, root) == 2 * 2 * 3  # variants x directions x K
    assert "mean_pool" in info["text"]


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["report", str(tmp_path), "--tsne-points", "-1"]) == 2
    assert "--tsne-points" in capsys.readouterr().err
