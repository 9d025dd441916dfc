"""QA samples -> cached image features: the batches the vlm task trains and evaluates on.

Each distinct image is encoded once by the frozen vision backbone through the feature cache (as
for alignment); a QABatch is the image features plus the questions and answers as text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.qa import as_sample
from ..data.samples import DataReport
from ..data.vqa import QASample
from ..encoders.base import EncoderOutput, FrozenEncoder
from .pipeline import build_paired_data


@dataclass
class QABatch:
    features: EncoderOutput  # image tokens of the batch's samples
    questions: list[str]
    answers: list[str]


class QAData:
    """QA samples with their row in the image feature table; ``batch(idx)`` -> QABatch."""

    def __init__(self, samples: list[QASample], rows: torch.Tensor, table):
        self.samples, self.rows, self.table = samples, rows, table

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, keep: list[int]) -> "QAData":
        return QAData([self.samples[i] for i in keep], self.rows[torch.tensor(keep, dtype=torch.long)], self.table)

    def group_ids(self) -> torch.Tensor:
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(s.image, len(ids)) for s in self.samples], dtype=torch.long)

    def batch(self, idx: torch.Tensor) -> QABatch:
        picked = [self.samples[int(i)] for i in idx]
        return QABatch(self.table.batch(self.rows[idx]), [s.question for s in picked], [s.answer for s in picked])


def build_qa_data(samples: list[QASample], encoder: FrozenEncoder, report: DataReport, cache_dir: Path | None,
                  cache_dtype: str = "float16", progress: bool = True) -> QAData:
    """Encode (or find in the cache) every distinct image; samples whose image fails are dropped
    and recorded in the report."""
    as_samples = [as_sample(s) for s in samples]
    paired = build_paired_data(as_samples, {"image": encoder}, report, cache_dir, cache_dtype, progress=progress)
    position = {id(s): i for i, s in enumerate(as_samples)}
    kept = [position[id(s)] for s in paired.samples]
    return QAData([samples[i] for i in kept], paired.rows["image"], paired.tables["image"])
