"""Question-answer data for the decoders: dataset specs -> QASamples -> cached image features.

    easy-vqa[:train|:test]    easy-VQA from pip easy-vqa (official splits; no suffix = both)
    jsonl:FILE                one object a line: image, question, answer [, split]
    captions:SPEC             any caption dataset (coco:DIR, flickr8k:DIR, jsonl:FILE ...) as QA:
                              "Describe this image." -> the caption (the seeds' PixMo conversion)

Each image is encoded once by the frozen vision backbone through the feature cache, exactly as
for alignment; a QAData batch is the image features plus the questions and answers as text.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..encoders.base import EncoderOutput, FrozenEncoder
from ..errors import DataError
from .formats import read_dataset
from .pipeline import build_paired_data
from .samples import DataReport, Sample
from .split import sample_splits
from .vqa import QASample, captions_as_qa, read_easy_vqa, read_qa_jsonl

SPLIT_NAMES = {"train": None, "dev": "val", "val": "val", "validation": "val", "test": "test"}


def read_qa(spec: str, report: DataReport) -> list[QASample]:
    kind, _, where = spec.partition(":")
    if kind == "easy-vqa":
        samples, skipped = read_easy_vqa(where or None)
    elif kind == "jsonl" and where:
        samples, skipped = read_qa_jsonl(where)
    elif kind == "captions" and where:
        samples, skipped = captions_as_qa(read_dataset(where, report), split="train")
    else:
        raise DataError(f"QA dataset spec {spec!r}: expected easy-vqa[:train|:test], jsonl:FILE or captions:SPEC")
    report.skipped.extend(skipped)
    report.read[spec] += len(samples) + len(skipped)
    if not samples:
        raise DataError(f"QA dataset {spec!r}: no usable samples ({len(skipped)} skipped)")
    return samples


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


def as_sample(qa: QASample) -> Sample:
    """The alignment pipeline's view of a QA sample: its image, grouped by image, with its split."""
    return Sample(group=qa.image, source=qa.source, image=qa.image, split=SPLIT_NAMES.get(qa.split))


def split_group(qa: QASample) -> str:
    """The unit a QA split keeps together: the image, so that no image of a hashed split is in two
    splits. A split the dataset gives is honoured per question instead: VQA datasets split their
    questions, and the same photo may carry train and test questions (coco1k vqa_yesno does)."""
    split = SPLIT_NAMES.get(qa.split, qa.split) if qa.split else None
    return qa.image if split is None else f"{qa.image}|{split}"


def qa_splits(samples: list[QASample], val: float, test: float, seed: int) -> list[str]:
    """The split ("train", "val" or "test") of every sample: given splits as they are, the rest
    hashed by image (split.sample_splits)."""
    groups = sample_splits([replace(as_sample(s), group=split_group(s)) for s in samples], val, test, seed)
    where = {g: name for name, members in groups.items() for g in members}
    return [where[split_group(s)] for s in samples]


def build_qa_data(samples: list[QASample], encoder: FrozenEncoder, report: DataReport, cache_dir: Path | None,
                  cache_dtype: str = "float16", progress: bool = True) -> QAData:
    """Encode (or find in the cache) every distinct image; samples whose image fails are dropped
    and recorded in the report."""
    as_samples = [as_sample(s) for s in samples]
    paired = build_paired_data(as_samples, {"image": encoder}, report, cache_dir, cache_dtype, progress=progress)
    position = {id(s): i for i, s in enumerate(as_samples)}
    kept = [position[id(s)] for s in paired.samples]
    return QAData([samples[i] for i in kept], paired.rows["image"], paired.tables["image"])
