"""Dataset formats -> lists of Samples. A spec names a format and a location:

    coco:DIR        COCO captions json (DIR/captions.json or DIR/annotations/captions_*.json) + images
    flickr8k:DIR    DIR/captions.txt with header ``image,caption`` + DIR/images/
    jsonl:FILE      one object per line with any of ``image``, ``audio``, ``text`` (paths relative to FILE),
                    optionally ``group``
    parquet:FILE    PixMo-style table: an image column (path, bytes or URL) and a caption column;
                    URLs are downloaded in parallel into the cache (download.py: retries, settings)
    fsdd:DIR        Free Spoken Digit Dataset recordings (fsdd.py)
    spoken:SPEC     another dataset's captions spoken by espeak-ng voices, cached (speech.py);
                    spoken:K:SPEC speaks each caption with K voices
    wds:DIR         webdataset tar shards (edge-glass shard / download; shards.py), also
                    wds:DIR/shard-{000000..000009}.tar; media read from the tars on demand

Relative locations are looked up in the working directory, then in the data root
($EDGE_GLASS_DATA, default ../shared/data). Unusable rows (empty caption, missing file, bad
line) are skipped and recorded in the DataReport with their source; the run goes on.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DataError
from ..paths import resolve_data_path
from .download import UrlFetcher, table_rows
from .samples import DataReport, Sample

Reader = Callable[[Path, DataReport], list[Sample]]
FORMATS: dict[str, Reader] = {}
OVER_SPECS: set[str] = set()  # formats whose location is another dataset spec (spoken:coco:DIR)


def dataset_format(name: str, over_spec: bool = False) -> Callable[[Reader], Reader]:
    """Register a reader; ``over_spec`` readers get the rest of the spec (a string), not a path."""
    def deco(fn: Reader) -> Reader:
        FORMATS[name] = fn
        if over_spec:
            OVER_SPECS.add(name)
        return fn

    return deco


def clean_text(text: object) -> str:
    """Collapse runs of whitespace and strip; non-strings become ''."""
    return " ".join(text.split()) if isinstance(text, str) else ""


def parse_spec(spec: str) -> tuple[str, Any]:
    kind, sep, where = spec.partition(":")
    if not sep or kind not in FORMATS:
        raise DataError(f"dataset spec {spec!r}: expected FORMAT:PATH with FORMAT one of {', '.join(sorted(FORMATS))}")
    if kind in OVER_SPECS:
        return kind, where
    path = resolve_data_path(where)
    if not path.exists():
        raise DataError(f"dataset spec {spec!r}: {path} does not exist")
    return kind, path


def read_dataset(spec: str, report: DataReport | None = None) -> list[Sample]:
    """All usable samples of a dataset spec; skipped rows go to ``report``."""
    kind, path = parse_spec(spec)
    report = report if report is not None else DataReport()
    before = len(report.skipped)
    samples = FORMATS[kind](path, report)
    report.read[spec] += len(samples) + len(report.skipped) - before
    if not samples:
        raise DataError(f"dataset {spec!r}: no usable samples ({len(report.skipped)} skipped; see the data report)")
    return samples


def limit_groups(samples: list[Sample], max_groups: int | None) -> list[Sample]:
    """Keep the samples of the first ``max_groups`` groups (in file order)."""
    if max_groups is None:
        return samples
    keep: dict[str, None] = {}
    for s in samples:
        if s.group not in keep:
            if len(keep) == max_groups:
                continue
            keep[s.group] = None
    return [s for s in samples if s.group in keep]


def _add_pair(out: list[Sample], report: DataReport, source: str, image: Path, caption: object, group: str) -> None:
    text = clean_text(caption)
    if not text:
        report.skip(source, "empty caption", str(image))
    elif not image.is_file():
        report.skip(source, "image file not found", str(image))
    else:
        out.append(Sample(group=group, source=source, image=str(image), text=text))


@dataset_format("coco")
def read_coco(root: Path, report: DataReport) -> list[Sample]:
    if root.is_file():
        ann_file, root = root, root.parent
    else:
        cands = [root / "captions.json", *sorted((root / "annotations").glob("captions_*.json")), *sorted(root.glob("captions*.json"))]
        ann_file = next((c for c in cands if c.is_file()), None)
        if ann_file is None:
            raise DataError(f"coco:{root}: no captions.json or annotations/captions_*.json")
    try:
        data = json.loads(ann_file.read_text())
        images = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = data["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{ann_file}: not a COCO captions file ({type(exc).__name__}: {exc})") from None
    img_dirs = [d for d in (root / "images", root / ann_file.stem.replace("captions_", ""), root) if d.is_dir()]
    out: list[Sample] = []
    for i, ann in enumerate(annotations):
        source = f"{ann_file} annotation {ann.get('id', i)}"
        name = images.get(ann.get("image_id"))
        if name is None:
            report.skip(source, "annotation names an image id not in `images`")
            continue
        image = next((d / name for d in img_dirs if (d / name).is_file()), img_dirs[0] / name)
        _add_pair(out, report, source, image, ann.get("caption"), group=name)
    return out


@dataset_format("flickr8k")
def read_flickr8k(root: Path, report: DataReport) -> list[Sample]:
    cap_file = root / "captions.txt" if root.is_dir() else root
    root = cap_file.parent
    if not cap_file.is_file():
        raise DataError(f"flickr8k:{root}: captions.txt not found")
    img_dir = next((d for d in (root / "images", root / "Images") if d.is_dir()), root / "images")
    lines = cap_file.read_text(encoding="utf-8-sig").splitlines()
    if not lines or [h.strip().lower() for h in lines[0].split(",")] != ["image", "caption"]:
        raise DataError(f"{cap_file}: expected the header line 'image,caption', got {lines[0][:60]!r}" if lines else f"{cap_file}: empty file")
    out: list[Sample] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, caption = line.partition(",")  # file names have no commas; captions may
        if not sep:
            report.skip(f"{cap_file}:{n}", "line has no comma")
            continue
        caption = caption.strip()
        if len(caption) >= 2 and caption[0] == caption[-1] == '"':
            caption = next(csv.reader(io.StringIO(caption)))[0]
        _add_pair(out, report, f"{cap_file}:{n}", img_dir / name.strip(), caption, group=name.strip())
    return out


class BadLine(NamedTuple):
    reason: str
    input: str  # the line's start, undecodable bytes escaped


def utf8_lines(path: Path) -> Iterator[tuple[int, str | None, BadLine | None]]:
    """``(line number, text, None)`` for each line of a UTF-8 file (a leading BOM dropped), or
    ``(line number, None, BadLine)`` for a line that is not valid UTF-8; other lines are unaffected."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield n, raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
                yield n, None, BadLine(reason, raw[:80].decode("utf-8", "backslashreplace"))


@dataset_format("jsonl")
def read_jsonl(path: Path, report: DataReport) -> list[Sample]:
    if path.is_dir():
        raise DataError(f"jsonl:{path}: expected a .jsonl file, got a directory")
    base = path.parent
    out: list[Sample] = []
    for n, line, bad in utf8_lines(path):
        source = f"{path}:{n}"
        if line is None:
            report.skip(source, bad.reason, bad.input)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            report.skip(source, f"bad JSON line ({exc})")
            continue
        if not isinstance(row, dict):
            report.skip(source, "bad JSON line (not an object)")
            continue
        text = row.get("text", row.get("caption"))
        fields: dict[str, object] = {}
        for key in ("image", "audio"):
            if row.get(key):
                p = Path(row[key])
                fields[key] = base / p if not p.is_absolute() else p
        if text is not None:
            fields["text"] = clean_text(text)
            if not fields["text"]:
                report.skip(source, "empty caption", str(row.get("image") or row.get("audio") or ""))
                continue
        missing = [f"{k} file not found" for k in ("image", "audio") if k in fields and not Path(fields[k]).is_file()]  # type: ignore[arg-type]
        if missing:
            report.skip(source, missing[0], str(fields.get("image") or fields.get("audio")))
            continue
        if len(fields) < 2:
            report.skip(source, "needs at least two of image, audio, text")
            continue
        group = str(row.get("group") or row.get("image") or row.get("audio"))
        out.append(Sample(group=group, source=source, **{k: (str(v) if k != "text" else v) for k, v in fields.items()}))
    return out


IMAGE_COLUMNS = ("image", "image_path", "image_bytes", "image_url", "url", "file_name")
CAPTION_COLUMNS = ("caption", "text", "caption_text", "description")


@dataset_format("parquet")
def read_parquet(path: Path, report: DataReport) -> list[Sample]:
    """Rows in table order; image URLs are first downloaded together, in parallel (download.py)."""
    rows = table_rows(path)
    urls = [img for _, _, img, cap in rows if _is_url(img) and clean_text(cap)]
    fetched = UrlFetcher.from_env().fetch_all(urls) if urls else {}
    out: list[Sample] = []
    for file, i, img, cap in rows:
        source = f"{file} row {i}"
        if isinstance(img, (bytes, bytearray)):
            text = clean_text(cap)
            if not text:
                report.skip(source, "empty caption")
            elif not img:
                report.skip(source, "empty image bytes")
            else:
                out.append(Sample(group=hashlib.sha1(img).hexdigest(), source=source, image=bytes(img), text=text))
        elif not isinstance(img, str) or not img:
            report.skip(source, "no image value")
        elif _is_url(img):
            local, reason = fetched.get(img, (None, ""))
            if not clean_text(cap):
                report.skip(source, "empty caption", img)
            elif local is None:
                report.skip(source, reason, img)
            else:
                _add_pair(out, report, source, local, cap, group=img)
        else:
            p = Path(img)
            _add_pair(out, report, source, p if p.is_absolute() else file.parent / p, cap, group=img)
    return out


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


from . import fsdd, shards, speech  # noqa: F401,E402  (register the fsdd, wds and spoken formats)
