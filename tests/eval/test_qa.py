"""SQuAD-style QA metrics on hand-checked cases."""
from __future__ import annotations

import pytest

from edge_glass.eval.qa import exact_match, f1, normalize_answer, qa_metrics


@pytest.mark.parametrize("text,expected", [
    ("The Blue Circle.", "blue circle"),
    ("  an   apple,  a pear  ", "apple pear"),
    ("Theatre is THE place!", "theatre is place"),  # only whole-word articles go
    ("rock'n'roll", "rocknroll"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert exact_match("The red triangle!", "red  triangle") == 1.0
    assert exact_match("yes", "Yes.") == 1.0
    assert exact_match("no", "yes") == 0.0
    assert exact_match("red triangles", "red triangle") == 0.0


def test_f1_hand_checked():
    # pred {a, red, big, square} -> {red, big, square}; ref {red, square}: P 2/3, R 1, F1 0.8
    assert f1("a red big square", "the red square") == pytest.approx(0.8)
    assert f1("blue", "red") == 0.0
    assert f1("red red blue", "red blue blue") == pytest.approx(2 / 3)  # multiset overlap: red, blue
    assert f1("the", "a") == 1.0  # both normalise to empty
    assert f1("the", "red") == 0.0


def test_qa_metrics_takes_the_best_reference_and_reports_percentages():
    preds = ["blue", "a red big square", "no"]
    refs = [["navy", "Blue"], "the red square", ["yes"]]
    m = qa_metrics(preds, refs)
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_qa_metrics_rejects_mismatched_lengths_and_handles_empty():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        qa_metrics(["a", "b"], ["a"])
    assert qa_metrics([], []) == {"exact_match": 0.0, "f1": 0.0, "n": 0}
