"""QA samples -> cached image and audio features: the batches the vlm task trains and evaluates on.

Each distinct image (and audio clip) is encoded once by its frozen backbone through the feature
cache (as for alignment); a QABatch is the features of the modalities its samples have, which
samples have them, and the questions and answers as text. A batch may mix samples with an
image only, audio only, or both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.qa import as_sample
from ..data.samples import DataReport
from ..data.vqa import QASample
from ..encoders.base import Encoder, EncoderOutput
from .pipeline import PairedData, build_paired_data


@dataclass
class QABatch:
    features: dict[str, EncoderOutput]  # per modality: the rows of the samples that have it
    present: dict[str, torch.Tensor]  # per modality: (B,) bool, which samples have it
    questions: list[str]
    answers: list[str]


class QAData:
    """QA samples with their rows in the per-modality feature tables; ``batch(idx)`` -> QABatch."""

    def __init__(self, samples: list[QASample], paired: PairedData):
        self.samples, self.paired = samples, paired

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, keep: list[int]) -> "QAData":
        return QAData([self.samples[i] for i in keep], self.paired.select(keep))

    def group_ids(self) -> torch.Tensor:
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(s.key, len(ids)) for s in self.samples], dtype=torch.long)

    def batch(self, idx: torch.Tensor) -> QABatch:
        picked = [self.samples[int(i)] for i in idx]
        b = self.paired.batch(idx)
        return QABatch(b.features, b.present, [s.question for s in picked], [s.answer for s in picked])


def build_qa_data(samples: list[QASample], encoders: dict[str, Encoder] | Encoder, report: DataReport, cache_dir: Path | None,
                  cache_dtype: str = "float16", progress: bool = True) -> QAData:
    """Encode (or find in the cache) every distinct image / clip of the modalities in
    ``encoders`` (a bare encoder: {"image": it}); samples whose input fails are dropped and
    recorded in the report. Modalities without an encoder are ignored."""
    if not isinstance(encoders, dict):
        encoders = {"image": encoders}
    as_samples = [as_sample(s) for s in samples]
    paired = build_paired_data(as_samples, encoders, report, cache_dir, cache_dtype, progress=progress)
    position = {id(s): i for i, s in enumerate(as_samples)}
    kept = [position[id(s)] for s in paired.samples]
    return QAData([samples[i] for i in kept], paired)
