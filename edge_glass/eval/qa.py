"""Question-answering metrics in the SQuAD style: exact match and token F1 after normalisation.

normalize_answer: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace
(the official SQuAD v1.1 evaluation, in that order). F1 of two empty answers is 1 (SQuAD v2).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (multiset overlap)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """{"exact_match": %, "f1": %, "n": count}. Each reference is one answer or a list of
    acceptable answers (the best-scoring one counts, per metric). n = 0 gives 0.0 scores."""
    if len(predictions) != len(references):
        raise ValueError(f"qa_metrics: {len(predictions)} predictions for {len(references)} references")
    em_total = f1_total = 0.0
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"qa_metrics: no reference answer for prediction {pred!r}")
        em_total += max(exact_match(pred, r) for r in refs)
        f1_total += max(f1(pred, r) for r in refs)
    n = len(predictions)
    return {"exact_match": 100.0 * em_total / n if n else 0.0, "f1": 100.0 * f1_total / n if n else 0.0, "n": n}


def wer_text(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCT).split())


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus word error rate (jiwer: (substitutions + deletions + insertions) / reference words),
    in %, on text lowercased with punctuation dropped (articles kept, unlike ``normalize_answer``):
    {"wer": %, "n": count, "words": reference words}. An empty prediction of a non-empty
    reference counts as all deletions; empty references are left out."""
    import jiwer

    if len(predictions) != len(references):
        raise ValueError(f"word_error_rate: {len(predictions)} predictions for {len(references)} references")
    refs = [wer_text(r) for r in references]
    keep = [i for i, r in enumerate(refs) if r]  # jiwer rejects empty references
    if not keep:
        return {"wer": 0.0, "n": 0, "words": 0}
    hyps = [wer_text(predictions[i]) for i in keep]
    out = jiwer.process_words([refs[i] for i in keep], hyps)
    words = sum(len(refs[i].split()) for i in keep)
    return {"wer": 100.0 * (out.substitutions + out.deletions + out.insertions) / words, "n": len(keep), "words": words}
