"""Question-answer datasets -> lists of QASample, with every unusable row skipped and counted.

Readers return ``(samples, skipped)``: ``skipped`` is a list of ``Skipped(source, reason, input)``
(the same record as ``DataReport.skipped``), so ``report.skipped.extend(skipped)`` merges them.

  * ``read_easy_vqa``    easy-VQA from pip ``easy-vqa`` (official train/test split, 13 answers)
  * ``read_qa_jsonl``    one object a line: ``image``, ``question``, ``answer`` [, ``split``]
  * ``captions_as_qa``   (image, caption) pairs -> "Describe this image." -> caption
  * ``read_coco_captions_qa``  the same from a COCO captions json
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..paths import resolve_data_path
from .formats import utf8_lines
from .samples import Skipped

DESCRIBE = "Describe this image."
KINDS = ("qa", "transcript", "caption")


@dataclass(frozen=True)
class QASample:
    """One decoder example: optional image, optional audio, a text question (may be empty when
    there is audio: a spoken question) and the answer.

    kind: what the answer is, for metrics: "qa" (a short answer), "transcript" (the audio's
    words: word error rate is reported too) or "caption".
    """

    image: str | None  # absolute path
    question: str
    answer: str
    split: str
    source: str  # where it came from, for messages ("vqa_yesno.jsonl:12")
    audio: str | None = None  # absolute path
    kind: str = "qa"

    @property
    def key(self) -> str:
        """The input that identifies the sample for splitting: its image, else its audio."""
        return self.image if self.image is not None else str(self.audio)

    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in ("image", "audio") if getattr(self, m) is not None)


def _text(value: Any) -> str:
    """Strings (and numbers, as VQA answers sometimes are) with whitespace collapsed; else ''."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return " ".join(str(value).split())


def _make(image: str | Path | None, question: Any, answer: Any, split: str, source: str,
          skipped: list[Skipped], exists: dict[Any, bool], audio: str | Path | None = None, kind: str = "qa") -> QASample | None:
    """A sample, or None after recording why the row is unusable. It needs an image or an
    audio clip (both may be given), an answer, and a question unless there is audio (a spoken
    question, or audio to transcribe, needs no text)."""
    q, ans = _text(question), _text(answer)
    reason = None
    for path in (image, audio):
        if path is not None and path not in exists:
            exists[path] = os.path.isfile(path)
    if image is None and audio is None:
        reason = "no image path"
    elif image is not None and not exists[image]:
        reason = f"image not found ({image})"
    elif audio is not None and not exists[audio]:
        reason = f"audio not found ({audio})"
    elif not q and audio is None:
        reason = "empty question"
    elif not ans:
        reason = "empty answer"
    if reason:
        skipped.append(Skipped(source, reason, str(image or audio or "")))
        return None
    return QASample(None if image is None else str(image), q, ans, split, source, None if audio is None else str(audio), kind)


# --- easy-VQA --------------------------------------------------------------------------------

def easy_vqa_dir() -> Path:
    """The data directory inside the installed ``easy_vqa`` package (found without importing it)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("easy-VQA is not installed: pip install easy-vqa")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (root / "answers.txt").is_file():
        raise DataError(f"easy-VQA data not found under {root} (reinstall: pip install --force-reinstall easy-vqa)")
    return root


def easy_vqa_answers(root: Path | None = None) -> list[str]:
    """The 13 possible answers, in the package's order."""
    root = root or easy_vqa_dir()
    return [line.strip() for line in (root / "answers.txt").read_text().splitlines() if line.strip()]


def read_easy_vqa(split: str | None = None, root: Path | None = None) -> tuple[list[QASample], list[Skipped]]:
    """easy-VQA questions of one split ("train", "test") or both (None). Images are
    ``<split>/images/<id>.png``; questions.json rows are ``[question, answer, image_id]``."""
    root = root or easy_vqa_dir()
    splits = ("train", "test") if split is None else (split,)
    samples: list[QASample] = []
    skipped: list[Skipped] = []
    for s in splits:
        qfile = root / s / "questions.json"
        if not qfile.is_file():
            raise DataError(f"easy-VQA split {s!r}: {qfile} not found (splits: train, test)")
        image_dir = str(root / s / "images")
        names = set(os.listdir(image_dir)) if os.path.isdir(image_dir) else set()
        exists: dict[Any, bool] = {}
        for i, row in enumerate(json.loads(qfile.read_text())):
            source = f"easy_vqa/{s}/questions.json[{i}]"
            if not (isinstance(row, list) and len(row) == 3):
                skipped.append(Skipped(source, "row is not [question, answer, image_id]"))
                continue
            question, answer, image_id = row
            image = os.path.join(image_dir, f"{image_id}.png")
            exists.setdefault(image, f"{image_id}.png" in names)
            sample = _make(image, question, answer, s, source, skipped, exists)
            if sample:
                samples.append(sample)
    return samples, skipped


# --- JSONL -----------------------------------------------------------------------------------

def _image_path(value: Any, base: Path, image_root: Path | None, exists: dict[Path, bool]) -> Path | None:
    """Absolute path of an ``image`` field: as given if absolute; else the first existing of
    <image_root>/value, <file dir>/value, <file dir>/images/value (else <file dir>/value)."""
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value.strip()).expanduser()
    if p.is_absolute():
        return p
    candidates = ([image_root / p] if image_root else []) + [base / p, base / "images" / p]
    for c in candidates:
        c = c.resolve()
        if c not in exists:
            exists[c] = c.is_file()
        if exists[c]:
            return c
    return (base / p).resolve()


def read_qa_jsonl(path: str | os.PathLike, split: str | None = None, default_split: str = "train",
                  image_root: str | os.PathLike | None = None) -> tuple[list[QASample], list[Skipped]]:
    """Rows ``{"image", "question", "answer"[, "split"]}``, where ``audio`` (a clip: a spoken
    question, or speech whose ``kind`` is "transcript") may accompany or replace the image and
    makes the question optional; rows without ``split`` get ``default_split``; ``split`` given:
    only that split. Image and audio paths may be absolute, relative to ``image_root``, to the
    file's directory, or to an ``images/`` directory beside the file."""
    path = resolve_data_path(path)
    if not Path(path).is_file():
        raise DataError(f"QA file {path} not found")
    base = Path(path).resolve().parent
    root = Path(image_root).resolve() if image_root else None
    samples: list[QASample] = []
    skipped: list[Skipped] = []
    exists: dict[Path, bool] = {}
    for lineno, line, bad in utf8_lines(Path(path)):
        source = f"{Path(path).name}:{lineno}"
        if line is None:
            skipped.append(Skipped(source, bad.reason, bad.input))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(source, f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            skipped.append(Skipped(source, "line is not a JSON object"))
            continue
        row_split = _text(row.get("split")) or default_split
        if split is not None and row_split != split:
            continue
        image = _image_path(row.get("image"), base, root, exists)
        audio = _image_path(row.get("audio"), base, root, exists)
        kind = row.get("kind") if row.get("kind") in KINDS else "qa"
        sample = _make(image, row.get("question"), row.get("answer"), row_split, source, skipped, exists, audio, kind)
        if sample:
            samples.append(sample)
    return samples, skipped


# --- captions as QA --------------------------------------------------------------------------

def captions_as_qa(pairs: Iterable[Any], split: str = "train", question: str = DESCRIBE,
                   source: str = "captions") -> tuple[list[QASample], list[Skipped]]:
    """(image, caption) or (image, caption, source) tuples, or objects with ``image``, ``text``
    and ``source`` attributes (edge_glass.data.samples.Sample) -> QASample(question -> caption)."""
    samples: list[QASample] = []
    skipped: list[Skipped] = []
    exists: dict[Path, bool] = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, tuple):
            image, caption, src = (*pair, f"{source}[{i}]")[:3]
        else:
            image, caption, src = getattr(pair, "image", None), getattr(pair, "text", None), getattr(pair, "source", f"{source}[{i}]")
        path = Path(image).expanduser().resolve() if isinstance(image, (str, os.PathLike)) and str(image).strip() else None
        sample = _make(path, question, caption, split, src, skipped, exists, kind="caption")
        if sample:
            samples.append(sample)
    return samples, skipped


def read_coco_captions_qa(path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                          split: str = "train") -> tuple[list[QASample], list[Skipped]]:
    """A COCO captions json (``images``, ``annotations``) as caption QA; images in
    ``images_dir`` (default: ``images/`` beside the json)."""
    path = Path(resolve_data_path(path))
    if not path.is_file():
        raise DataError(f"COCO captions file {path} not found")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    images = Path(images_dir) if images_dir else path.parent / "images"
    files = {im.get("id"): im.get("file_name") for im in data["images"] if isinstance(im, dict)}
    pairs = []
    for i, ann in enumerate(data["annotations"]):
        src = f"{path.name} annotation {ann.get('id', i) if isinstance(ann, dict) else i}"
        name = files.get(ann.get("image_id")) if isinstance(ann, dict) else None
        pairs.append((str(images / name) if name else "", ann.get("caption") if isinstance(ann, dict) else None, src))
    return captions_as_qa(pairs, split=split)
