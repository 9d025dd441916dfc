"""Zero-shot classification through the shared space: every class name is embedded as text and
each query (e.g. a spoken digit) takes the class whose text embedding is most similar.

    zero_shot_digits(model, data)  ->  {"accuracy": 81.3, "chance": 10.0, "n": 300,
                                        "per_speaker": {"george": 84.0, ...},
                                        "dims": {"512": {"accuracy": ..., "per_speaker": {...}}, ...}}

Accuracies are percentages; the top-level numbers are those of the largest dim.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..data.fsdd import DIGIT_WORDS, parse_recording
from ..data.pipeline import PairedData
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
def zero_shot_digits(model, data: PairedData, batch_size: int = 256) -> dict[str, Any]:
    """Spoken-digit classification of every FSDD clip in ``data`` against the texts "zero".."nine",
    overall and per speaker, at every dim. ``model`` is an AlignedModel (api.load)."""
    audio = data.rows.get("audio")
    keep = [] if audio is None else [i for i, s in enumerate(data.samples)
                                     if audio[i] >= 0 and s.text in DIGIT_WORDS and parse_recording(s.group) is not None]
    if not keep:
        raise EdgeGlassError("zero-shot digits: no FSDD recordings ({digit}_{speaker}_{take}.wav) among the samples")
    rows = audio[keep]
    targets = torch.tensor([DIGIT_WORDS.index(data.samples[i].text) for i in keep])
    speakers = [parse_recording(data.samples[i].group).speaker for i in keep]  # type: ignore[union-attr]
    queries = embed_rows(model.core, data, "audio", rows, batch_size)
    out: dict[str, Any] = {"chance": round(100.0 / len(DIGIT_WORDS), 2), "n": len(keep), "dims": {}}
    for d in model.dims:
        acc, per = accuracy_by_group(queries[d], model.encode_texts(DIGIT_WORDS, dim=d), targets, speakers)
        out["dims"][str(d)] = {"accuracy": acc, "per_speaker": per}
    return {**out["dims"][str(model.dims[0])], **out}
