"""The report's own small computations, on hand-made inputs (no model, no data)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_glass.report import alignment, vlm
from edge_glass.report.html import Cell, table


def qa(question: str, answer: str, prediction: str) -> dict:
    return {"question": question, "answer": answer, "prediction": prediction, "image": ""}


def test_answer_types_split_other_answers_into_families_by_template():
    preds = [qa(f"what color is the {s}?", c, c) for s in ("circle", "triangle") for c in ("red", "blue", "green")]
    preds += [qa("what shape is in the image?", s, "circle") for s in ("circle", "triangle", "rectangle")] * 2
    preds += [qa(f"is there a {c} shape?", a, "yes") for c in ("red", "blue") for a in ("yes", "no")]
    preds += [qa("how many shapes?", "2", "2")]
    types = vlm.answer_types(preds)
    assert set(types) == {"other: blue, green, red", "other: circle, rectangle, triangle", "yes/no", "number"}
    what, groups = vlm.question_groups(preds)
    assert what == "question template" and "what color is the _" in groups and "is there a _ shape" in groups
    rows = dict(vlm.grouped_metrics(preds, types))
    assert rows["other: blue, green, red"]["exact_match"] == 100.0 and rows["yes/no"]["exact_match"] == 50.0
    assert vlm.closed_set(preds)[:2] == ["no", "yes"]  # yes/no first


def test_open_questions_fall_back_to_question_types_and_no_closed_set():
    preds = [qa(f"where is object{i} now?", f"place{i}", "") for i in range(60)]
    what, groups = vlm.question_groups(preds)
    assert what.startswith("question type") and groups[:2] == ["where is object0", "where is object1"]
    assert vlm.closed_set(preds) is None


def space_of(a: torch.Tensor, b: torch.Tensor) -> alignment.Space:
    n = len(a)
    idx = torch.arange(n)
    return alignment.Space(["image", "text"], {"image": list(range(n)), "text": [f"t{i}" for i in range(n)]},
                           {"image": {a.shape[1]: a}, "text": {b.shape[1]: b}}, {"image": {}, "text": {}},
                           {"image": idx, "text": idx}, [a.shape[1]])


def test_modality_gap_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(7, 8, generator=g) + 1.0, dim=1)
    st = alignment.gap_stats(space_of(a, b), "image", "text", 8)
    sims = a.double() @ b.double().t()
    assert abs(st["matched_cosine"] - float(sims.diag().mean())) < 1e-9
    assert abs(st["unmatched_cosine"] - float(sims[~torch.eye(7, dtype=torch.bool)].mean())) < 1e-9
    assert abs(st["centroid_distance"] - float((a.double().mean(0) - b.double().mean(0)).norm())) < 1e-9


def test_cells_carry_the_json_key_and_escape_text():
    html = table(["a", "b"], [[Cell(12.345, key="dims/64/text_to_image/R@1"), "<b>x</b>"]])
    assert 'data-key="dims/64/text_to_image/R@1"' in html and ">12.35<" in html and "&lt;b&gt;" in html
