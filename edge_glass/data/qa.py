"""Question-answer data for the decoders: dataset specs -> QASamples -> cached image features.

    easy-vqa[:train|:test]    easy-VQA from pip easy-vqa (official splits; no suffix = both)
    jsonl:FILE                one object a line: image, question, answer [, split]
    captions:SPEC             any caption dataset (coco:DIR, flickr8k:DIR, jsonl:FILE ...) as QA:
                              "Describe this image." -> the caption (the seeds' PixMo conversion)
    spoken-qa:[K:]SPEC        SPEC's questions spoken (held-out voice on its test split)
    transcribe:SPEC           an audio-text dataset as speech to text (fsdd:DIR, jsonl:asterisk/...)
    av-captions:SPEC          a photo + one caption spoken -> another caption of the photo
                              (the three are in edge_glass.data.spoken_qa)

Images are encoded once by the frozen vision backbone through the feature cache, exactly as
for alignment (``edge_glass.features.qa``).
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import DataError
from .formats import read_dataset
from .samples import DataReport, Sample
from .split import sample_splits
from .spoken_qa import read_av_captions, read_spoken_qa, read_transcribe
from .vqa import QASample, captions_as_qa, read_easy_vqa, read_qa_jsonl

SPEECH_KINDS = {"spoken-qa": read_spoken_qa, "transcribe": read_transcribe, "av-captions": read_av_captions}

SPLIT_NAMES = {"train": None, "dev": "val", "val": "val", "validation": "val", "test": "test"}


def read_qa(spec: str, report: DataReport) -> list[QASample]:
    kind, _, where = spec.partition(":")
    if kind == "easy-vqa":
        samples, skipped = read_easy_vqa(where or None)
    elif kind == "jsonl" and where:
        samples, skipped = read_qa_jsonl(where)
    elif kind == "captions" and where:
        samples, skipped = captions_as_qa(read_dataset(where, report), split="train")
    elif kind in SPEECH_KINDS and where:
        samples, skipped = SPEECH_KINDS[kind](where, report), []
    else:
        raise DataError(f"QA dataset spec {spec!r}: expected easy-vqa[:train|:test], jsonl:FILE, captions:SPEC, "
                        "spoken-qa:SPEC, transcribe:SPEC or av-captions:SPEC")
    report.skipped.extend(skipped)
    report.read[spec] += len(samples) + len(skipped)
    if not samples:
        raise DataError(f"QA dataset {spec!r}: no usable samples ({len(skipped)} skipped)")
    return samples


def as_sample(qa: QASample) -> Sample:
    """The alignment pipeline's view of a QA sample: its image and audio, grouped by its key
    (the image, else the audio), with its split."""
    return Sample(group=qa.key, source=qa.source, image=qa.image, audio=qa.audio, split=SPLIT_NAMES.get(qa.split))


def split_group(qa: QASample) -> str:
    """The unit a QA split keeps together: the image (the audio for audio-only samples), so that no image of a hashed split is in two
    splits. A split the dataset gives is honoured per question instead: VQA datasets split their
    questions, and the same photo may carry train and test questions (coco1k vqa_yesno does)."""
    split = SPLIT_NAMES.get(qa.split, qa.split) if qa.split else None
    return qa.key if split is None else f"{qa.key}|{split}"


def qa_splits(samples: list[QASample], val: float, test: float, seed: int) -> list[str]:
    """The split ("train", "val" or "test") of every sample: given splits as they are, the rest
    hashed by image (split.sample_splits)."""
    groups = sample_splits([replace(as_sample(s), group=split_group(s)) for s in samples], val, test, seed)
    where = {g: name for name, members in groups.items() for g in members}
    return [where[split_group(s)] for s in samples]
