"""Decoder tasks that hear: spoken questions, speech to text, and audio-visual captioning.

    spoken-qa:[K:]SPEC    a QA spec (easy-vqa:test, jsonl:coco1k/vqa_yesno.jsonl, ...) with every
                          question spoken by espeak-ng. Train / val questions: one of K voice
                          variants (default 16) from the training pool, chosen per (image,
                          question); questions of the dataset's own test split: the held-out
                          voice (an accent, variant and speed training never hears), so a test
                          sample has an unseen image *and* an unseen voice. The text question is
                          kept on the sample (for the text-question ablation and for reports);
                          configs drop it (``drop: [question]``) to answer from the audio alone.
    transcribe:SPEC       an audio-text dataset (fsdd:DIR, jsonl:asterisk/transcripts.jsonl,
                          spoken:SPEC, ...) as speech-to-text: audio -> its transcript
                          (kind "transcript": word error rate is reported).
    av-captions:SPEC      a caption dataset (coco:coco1k, flickr8k:DIR ...): a photo plus one of
                          its captions spoken -> a *different* caption of the same photo.

Clips are synthesised once into <cache root>/speech/ (content-addressed FLAC, see
``edge_glass.data.speech``). A voice depends only on the text and the variant index, so the 107
distinct easy-VQA questions need 107 x K training clips however many images ask them.
Held-out voices follow the dataset's *own* test split; a split Edge Glass hashes (a dataset
without one) holds out images or clips, but its test questions are spoken by training voices.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import replace

from ..errors import DataError
from ..paths import cache_root
from .formats import read_dataset
from .samples import DataReport
from .speech import HELDOUT_POOL, TRAIN_POOL, speak_clips
from .vqa import DESCRIBE, QASample

TRANSCRIBE = "Transcribe the audio."
DEFAULT_VOICES = 16
HELD_OUT_SPLITS = ("test",)


def _variant(key: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


def _count_prefix(inner: str, what: str, default: int) -> tuple[int, str]:
    """``K:SPEC`` -> (K, SPEC); plain ``SPEC`` -> (default, SPEC)."""
    count, sep, rest = inner.partition(":")
    if sep and count.isdigit():
        if int(count) < 1:
            raise DataError(f"{what}:{count}:...: the number of voices must be at least 1")
        return int(count), rest
    return default, inner


def spoken_questions(samples: list[QASample], voices: int = DEFAULT_VOICES) -> list[QASample]:
    """The same samples with ``audio`` = the question spoken (see the module docstring)."""
    jobs = []
    for s in samples:
        if (s.split or "").lower() in HELD_OUT_SPLITS:
            voice = HELDOUT_POOL.pick(s.question)
        else:
            voice = TRAIN_POOL.pick(f"{_variant(f'{s.image}|{s.question}', voices)}|{s.question}")
        jobs.append((s.question, voice))
    paths = speak_clips(jobs, cache_root() / "speech", "flac")
    return [replace(s, audio=str(p)) for s, p in zip(samples, paths)]


def read_spoken_qa(inner: str, report: DataReport) -> list[QASample]:
    from .qa import read_qa  # qa dispatches here

    voices, spec = _count_prefix(inner, "spoken-qa", DEFAULT_VOICES)
    if not spec:
        raise DataError("spoken-qa:SPEC: name the QA dataset to speak, e.g. spoken-qa:easy-vqa:test")
    samples = read_qa(spec, report)
    if any(s.audio is not None for s in samples):
        raise DataError(f"spoken-qa:{spec}: its samples already carry audio")
    return spoken_questions(samples, voices)


def read_transcribe(inner: str, report: DataReport) -> list[QASample]:
    """Audio-text samples -> QASample(audio, question "Transcribe the audio.", answer = text)."""
    out: list[QASample] = []
    for s in read_dataset(inner, report):
        if s.audio is None:
            continue  # image-text rows of a mixed dataset: nothing to transcribe
        if not isinstance(s.audio, str):
            report.skip(s.source, "audio is not a file (transcribe: needs a path)")
        elif not (s.text or "").strip():
            report.skip(s.source, "empty transcript", s.audio)
        else:
            out.append(QASample(None, TRANSCRIBE, " ".join(s.text.split()), s.split or "train", s.source, s.audio, "transcript"))
    return out


def read_av_captions(inner: str, report: DataReport) -> list[QASample]:
    """Each caption of a photo spoken (training voices, seeded by image and caption), paired with
    the photo and answered by the photo's next caption; photos with one caption are skipped."""
    by_image: dict[str, list] = defaultdict(list)
    for s in read_dataset(inner, report):
        if isinstance(s.image, str) and (s.text or "").strip():
            by_image[s.image].append(s)
    chosen = []
    for image, caps in by_image.items():
        if len(caps) < 2:
            report.skip(caps[0].source, "only one caption: no different caption to answer with", image)
            continue
        for i, s in enumerate(caps):
            chosen.append((s, caps[(i + 1) % len(caps)]))
    paths = speak_clips([(s.text, TRAIN_POOL.pick(f"av|{s.image}|{s.text}")) for s, _ in chosen], cache_root() / "speech", "flac")
    return [QASample(s.image, DESCRIBE, " ".join(target.text.split()), s.split or "train", s.source, str(p), "caption")
            for (s, target), p in zip(chosen, paths)]
