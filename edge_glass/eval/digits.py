"""Spoken-digit classification through the shared space: each class name ("zero".."nine") is
embedded as text and each clip takes the class whose text embedding is most similar.

Not zero-shot when the model was trained on FSDD: then it is closed-set accuracy on held-out
takes of the same ten words (and, unless a speaker was held out of training, the same speakers);
benchmarks/fsdd_heldout_speaker.py measures a speaker never heard in training.

    spoken_digit_accuracy(model, data)  ->  {"accuracy": 81.3, "chance": 10.0, "n": 300,
                                        "per_speaker": {"george": 84.0, ...}, "per_digit": {"zero": 90.0, ...},
                                        "dims": {"512": {"accuracy": ..., "per_speaker": {...}}, ...}}

Accuracies are percentages; the top-level numbers are those of the largest dim.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..data.fsdd import DIGIT_WORDS, parse_recording
from ..features.pipeline import PairedData
from ..errors import EdgeGlassError
from .retrieval import embed_rows


def accuracy_by_group(queries: torch.Tensor, classes: torch.Tensor, targets: torch.Tensor, groups: list[str]) -> tuple[float, dict[str, float]]:
    """queries (N, d), classes (C, d) unit vectors, targets (N,) class ids -> (accuracy %, {group: accuracy %})."""
    correct = (queries @ classes.t()).argmax(1) == targets
    by: dict[str, list[bool]] = defaultdict(list)
    for g, c in zip(groups, correct.tolist()):
        by[g].append(c)
    return round(100.0 * correct.float().mean().item(), 2), {g: round(100.0 * sum(v) / len(v), 2) for g, v in sorted(by.items())}


@torch.no_grad()
def spoken_digit_accuracy(model, data: PairedData, batch_size: int = 256) -> dict[str, Any]:
    """Spoken-digit classification of every FSDD clip in ``data`` against the texts "zero".."nine",
    overall and per speaker, at every dim. ``model`` is an AlignedModel."""
    audio = data.rows.get("audio")
    keep = [] if audio is None else [i for i, s in enumerate(data.samples)
                                     if audio[i] >= 0 and s.text in DIGIT_WORDS and parse_recording(s.group) is not None]
    if not keep:
        raise EdgeGlassError("spoken digits: no FSDD recordings ({digit}_{speaker}_{take}.wav) among the samples")
    rows = audio[keep]
    targets = torch.tensor([DIGIT_WORDS.index(data.samples[i].text) for i in keep])
    speakers = [parse_recording(data.samples[i].group).speaker for i in keep]  # type: ignore[union-attr]
    queries = embed_rows(model.core, data, "audio", rows, batch_size)
    out: dict[str, Any] = {"chance": round(100.0 / len(DIGIT_WORDS), 2), "n": len(keep), "dims": {}}
    for d in model.dims:
        classes = model.encode_texts(DIGIT_WORDS, dim=d)
        acc, per = accuracy_by_group(queries[d], classes, targets, speakers)
        _, per_digit = accuracy_by_group(queries[d], classes, targets, [data.samples[i].text for i in keep])
        out["dims"][str(d)] = {"accuracy": acc, "per_speaker": per, "per_digit": {w: per_digit[w] for w in DIGIT_WORDS if w in per_digit}}
    return {**out["dims"][str(model.dims[0])], **out}
