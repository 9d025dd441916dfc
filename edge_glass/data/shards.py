"""Webdataset tar shards: ``edge-glass shard SPEC --out DIR`` writes them from any dataset spec,
``wds:DIR`` reads them back as a dataset spec, ``ShardStream`` / ``iter_shards`` stream them
across ranks and DataLoader workers (resumable mid-epoch), and ``edge-glass download``
(download.py) fills them straight from URL tables.

Layout of a shard set (a public format; ``FORMAT``, ``VERSION``)::

    DIR/shard-000000.tar, shard-000001.tar, ...
        webdataset tars, ``SHARD_SIZE`` records each (the last one fewer); each is written under
        a temporary name and renamed, so a killed writer never leaves a torn shard
    DIR/index.json
        written last; wids-compatible: {"wids_version": 1, "shardlist": [{"url": "shard-000000.tar",
        "nsamples": <records>, "samples": <samples>}, ...]} plus "format", "version", "source"
        (the spec it was made from), "settings", "records", "samples", "skipped",
        "skipped_by_reason", "failures"
    DIR/failures.jsonl
        every sample left out, one JSON object a line: {"source", "reason", "input"} (downloads
        add "url" and "row")
    DIR/parts/shard-000000.json
        a shard's bookkeeping (its counts, skips and the writer's settings), written just before
        the shard is renamed into place: a re-run with the same settings skips the shards that
        have one, so writing resumes where it stopped and a finished shard is never redone

One record per media item (an image, a clip, or an image + clip pair) with all of its texts::

    <key>.json  {"id": <key>, "group", "split", "source", "texts": [...], "sources": [...],
                 "positions": [...], "media": ["jpg", ...]}
    <key>.jpg   the image's original bytes under its real extension (jpg png webp gif bmp tiff)
    <key>.wav   the clip's original bytes under its real extension (wav flac ogg mp3)

``key`` is the zero-padded (9 digit) position of the record's first sample in the source;
``positions`` are the source positions of its texts (reading a set back restores the source's
sample order), ``sources`` their ``Sample.source``; a sample without text is a null in
``texts``; a text-only sample is a record without media. Media are checked before they are
written (a corrupt image is skipped and counted, never written).

Reading: ``wds:DIR`` (its index.json, else every DIR/*.tar), ``wds:DIR/shard-{000000..000003}.tar``
(brace patterns) or ``wds:FILE.tar`` yields the very Samples of the source, in its order, with
each image / clip a ``FileSlice`` (tar path, byte offset, size) read on demand: no media bytes
are held in memory. Listing checks each member's first bytes; a record whose media do not look
like their extension, lacks its json or lacks a medium its json names is skipped and counted.
A run on ``wds:DIR`` holds out the same groups as a run on the spec DIR was made from
(``split_identity``), so training from the shards equals training from the source.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, atomic_write_json, atomic_write_text
from ..errors import DataError, InputError
from ..media.files import FileSlice, read_bytes
from ..paths import resolve_data_path
from .formats import clean_text, dataset_format, read_dataset
from .samples import DataReport, Sample, Skipped

FORMAT, VERSION = "edge-glass-shards", 1
SHARD_NAME = "shard-{:06d}.tar"
INDEX, FAILURES, PARTS = "index.json", "failures.jsonl", "parts"
SHARD_SIZE = 1000  # records per shard (default)
KEY_DIGITS = 9

IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
AUDIO_FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
SPLITS = ("train", "val", "test")


def record_key(position: int) -> str:
    return f"{position:0{KEY_DIGITS}d}"


# -- checking and naming media ---------------------------------------------------------------

def image_ext(data: bytes, what: str) -> str:
    """The real extension of encoded image bytes, after checking that they decode fully."""
    from PIL import Image

    from ..media.images import open_image

    try:
        open_image(data)
    except InputError as exc:
        raise InputError(what, exc.reason) from None
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or ""
    return IMAGE_FORMATS.get(fmt, fmt.lower() or "img")


def audio_ext(data: bytes, what: str) -> str:
    """The real extension of encoded audio bytes, after checking that they decode fully."""
    import soundfile as sf

    from ..media.audio import decode_audio

    decode_audio(data, what)
    fmt = sf.info(io.BytesIO(data)).format
    return AUDIO_FORMATS.get(fmt, fmt.lower())


def looks_like(ext: str, head: bytes) -> bool:
    """Whether a file's first bytes match its extension (a cheap check made while listing)."""
    riff = head[:4] == b"RIFF"
    return {
        "jpg": head[:3] == b"\xff\xd8\xff", "jpeg": head[:3] == b"\xff\xd8\xff",
        "png": head[:8] == b"\x89PNG\r\n\x1a\n", "gif": head[:4] == b"GIF8", "bmp": head[:2] == b"BM",
        "tif": head[:4] in (b"II*\x00", b"MM\x00*"), "tiff": head[:4] in (b"II*\x00", b"MM\x00*"),
        "webp": riff and head[8:12] == b"WEBP", "wav": riff and head[8:12] == b"WAVE",
        "flac": head[:4] == b"fLaC", "ogg": head[:4] == b"OggS",
        "mp3": head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0),
    }.get(ext, True)


def _media_bytes(item: Any, kind: str) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if kind == "image" and hasattr(item, "save") and hasattr(item, "size"):  # a PIL image: stored as PNG
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return buf.getvalue()
    return read_bytes(item, kind)


def _media_id(item: Any) -> Any:
    if item is None:
        return None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha1(item).hexdigest())
    if isinstance(item, (str, os.PathLike)):
        return ("path", os.fspath(item))
    if isinstance(item, FileSlice):
        return ("slice", item)
    return ("object", id(item))


# -- writing ---------------------------------------------------------------------------------

@dataclass
class Record:
    """A media item (or a text-only sample) and every sample that uses it, in source order."""

    key: str
    group: str
    split: str | None
    image: Any = None
    audio: Any = None
    texts: list[str | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def meta(self, media: list[str]) -> dict[str, Any]:
        return {"id": self.key, "group": self.group, "split": self.split, "source": self.sources[0], "texts": self.texts,
                "sources": self.sources, "positions": self.positions, "media": media}

    def add(self, text: str | None, source: str, position: int) -> None:
        self.texts.append(text)
        self.sources.append(source)
        self.positions.append(position)


def group_records(samples: Iterable[Sample], positions: Iterable[int] | None = None) -> list[Record]:
    """Samples -> one record per distinct (image, audio, group, split), in order of first use;
    each text-only sample is a record of its own."""
    records: dict[Any, Record] = {}
    for pos, s in zip(positions if positions is not None else range(1 << 62), samples):
        ident = (_media_id(s.image), _media_id(s.audio), s.group, s.split)
        if ident[0] is None and ident[1] is None:
            ident = ("text", pos)
        rec = records.get(ident)
        if rec is None:
            rec = records[ident] = Record(record_key(pos), s.group, s.split, s.image, s.audio)
        rec.add(s.text, s.source, pos)
    return list(records.values())


Encoded = tuple[str, dict[str, Any], dict[str, bytes]]  # key, json, {ext: bytes}


def encode_record(rec: Record, skipped: list[dict[str, Any]]) -> Encoded | None:
    """The record's members (media read and checked), or None after adding one skip per sample."""
    media: dict[str, bytes] = {}
    for kind, item, ext_of in (("image", rec.image, image_ext), ("audio", rec.audio, audio_ext)):
        if item is None:
            continue
        what = str(item) if not isinstance(item, (bytes, bytearray)) else f"<{kind} bytes, {len(item)} B>"
        try:
            data = _media_bytes(item, kind)
            media[ext_of(data, what)] = data
        except InputError as err:
            skipped += [{"source": src, "reason": err.reason, "input": err.what} for src in rec.sources]
            return None
    return rec.key, rec.meta(list(media)), media


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


class ShardSetWriter:
    """Writes the shards of one set; ``settings`` say what the set holds: a re-run with equal
    settings skips the shards already written (``done``), other settings are refused."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]):
        self.out, self.settings = Path(out), settings
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out}: is a file, expected a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        old = self._existing_settings()
        if old is not None and old != settings:
            diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            raise DataError(f"{self.out}: already holds shards written with other settings (differing: {', '.join(diff)}); "
                            "use another --out folder, or delete this one to start over")

    def _existing_settings(self) -> dict[str, Any] | None:
        index = self.out / INDEX
        for path in [index, *sorted((self.out / PARTS).glob("shard-*.json"))]:
            try:
                return json.loads(path.read_text())["settings"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if any(self.out.glob("shard-*.tar")):
            raise DataError(f"{self.out}: holds shard files but no {INDEX} or {PARTS}/ (not written by edge-glass?); use another --out folder")
        return None

    def tar_path(self, k: int) -> Path:
        return self.out / SHARD_NAME.format(k)

    def part_path(self, k: int) -> Path:
        return self.out / PARTS / (Path(SHARD_NAME.format(k)).stem + ".json")

    def done(self, k: int) -> dict[str, Any] | None:
        """Shard k's part record if the shard is complete (written by a run with these settings)."""
        if not self.tar_path(k).is_file():
            return None
        try:
            part = json.loads(self.part_path(k).read_text())
        except (OSError, ValueError):
            return None
        return part if part.get("settings") == self.settings else None

    def write(self, k: int, records: Iterable[Encoded | None], skipped: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """Shard k from ``records`` (None entries are left out; ``skipped`` is complete once they
        are consumed); its part record is written just before the tar is renamed into place."""
        n_records = n_samples = 0
        with atomic_path(self.tar_path(k)) as tmp:
            with tarfile.open(tmp, "w") as tf:
                for item in records:
                    if item is None:
                        continue
                    key, meta, media = item
                    _add_member(tf, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                    for ext, data in media.items():
                        _add_member(tf, f"{key}.{ext}", data)
                    n_records += 1
                    n_samples += len(meta["texts"])
            part = {"shard": self.tar_path(k).name, "records": n_records, "samples": n_samples, "skipped": skipped,
                    "settings": self.settings, **extra}
            atomic_write_json(self.part_path(k), part)
        return part

    def finish(self, n_shards: int, source: str, read_skipped: list[Skipped] = (), **extra: Any) -> dict[str, Any]:
        """failures.jsonl and index.json (last) from the parts of shards 0 .. n_shards-1."""
        parts = [self.done(k) for k in range(n_shards)]
        missing = [self.tar_path(k).name for k, p in enumerate(parts) if p is None]
        if missing:
            raise DataError(f"{self.out}: shards {', '.join(missing[:5])} are not complete; run again to write them")
        failures = [{"source": s.source, "reason": s.reason, "input": s.input} for s in read_skipped]
        failures += [f for p in parts for f in p["skipped"]]
        atomic_write_text(self.out / FAILURES, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
        by_reason: dict[str, int] = {}
        for f in failures:
            r = f["reason"].split(" (")[0]
            by_reason[r] = by_reason.get(r, 0) + 1
        index = {
            "wids_version": 1,
            "shardlist": [{"url": p["shard"], "nsamples": p["records"], "samples": p["samples"]} for p in parts],
            "format": FORMAT, "version": VERSION, "source": source, "settings": self.settings,
            "records": sum(p["records"] for p in parts), "samples": sum(p["samples"] for p in parts),
            "skipped": len(failures), "skipped_by_reason": by_reason, "failures": FAILURES, **extra,
        }
        atomic_write_json(self.out / INDEX, index)
        return index


def _records_digest(records: list[Record]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(json.dumps([r.key, r.group, r.split, str(_media_id(r.image)), str(_media_id(r.audio)), r.texts, r.sources]).encode())
    return h.hexdigest()


def write_shards(spec: str, out: str | os.PathLike, shard_size: int = SHARD_SIZE, report: DataReport | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Shard a dataset spec into ``out`` (resumable: finished shards are kept); returns index.json
    plus "written" / "kept" (shards this run wrote / found already finished)."""
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1")
    report = report if report is not None else DataReport()
    before = len(report.skipped)
    samples = read_dataset(spec, report)
    read_skipped = report.skipped[before:]
    records = group_records(samples)
    settings = {"kind": "shard", "source": spec, "shard_size": shard_size, "records": len(records), "digest": _records_digest(records)}
    writer = ShardSetWriter(out, settings)
    n_shards = math.ceil(len(records) / shard_size)
    from tqdm.auto import tqdm

    written = 0
    for k in tqdm(range(n_shards), desc="shards", unit="shard", disable=not progress, leave=False):
        if writer.done(k):
            continue
        skipped: list[dict[str, Any]] = []
        chunk = records[k * shard_size:(k + 1) * shard_size]
        writer.write(k, (encode_record(r, skipped) for r in chunk), skipped)
        written += 1
        for s in skipped:
            report.skip(s["source"], s["reason"], s["input"])
    index = writer.finish(n_shards, spec, read_skipped)
    return {**index, "written": written, "kept": n_shards - written}


# -- reading: the wds: dataset spec ----------------------------------------------------------

def shard_paths(where: str) -> list[Path]:
    """The tar files of ``DIR`` (its index.json's shardlist, else DIR/*.tar), of a brace pattern
    (``DIR/shard-{000000..000009}.tar``) or of one ``.tar``; relative paths as dataset paths."""
    from braceexpand import braceexpand

    if not where:
        raise DataError("wds: expected wds:DIR, wds:DIR/shard-{000000..000009}.tar or wds:FILE.tar")
    out: list[Path] = []
    for part in braceexpand(where):
        p = resolve_data_path(part)
        if p.is_dir():
            index = p / INDEX
            if index.is_file():
                try:
                    urls = [e["url"] for e in json.loads(index.read_text())["shardlist"]]
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{index}: not a shard index ({type(exc).__name__}: {exc})") from None
                tars = [p / u for u in urls]
                gone = [t for t in tars if not t.is_file()]
                if gone:
                    raise DataError(f"{index} lists {gone[0].name}, which is missing ({len(gone)} shard(s) missing)")
            else:
                tars = sorted(t for t in p.glob("*.tar") if not t.name.startswith("."))
            if not tars:
                raise DataError(f"wds:{where}: no .tar shards in {p}")
            out += tars
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"wds:{where}: {p} does not exist")
    return out


def split_identity(spec: str) -> str:
    """What a spec's groups are split by (the seeded hash): the spec itself, except for
    ``wds:`` shards written by ``edge-glass shard`` / ``download``: the spec they came from, so a run
    on the shards holds out the same groups as a run on their source."""
    kind, _, where = spec.partition(":")
    if kind != "wds":
        return spec
    try:
        folders = {p.parent for p in shard_paths(where)}
        if len(folders) == 1:
            source = json.loads((folders.pop() / INDEX).read_text()).get("source")
            if isinstance(source, str) and source:
                return source
    except (DataError, OSError, ValueError, AttributeError):
        pass
    return spec


Check = Callable[[str, Any, str], str | None]  # (ext, medium, what) -> why it is bad, or None


def record_samples(key: str, members: dict[str, Any], where: str, report: DataReport,
                   check: Check | None = None) -> list[tuple[int | None, Sample]]:
    """A record's samples with their source positions; a bad record adds one skip per sample
    (or one, when its json is missing) to ``report`` and gives none. ``members``: {ext: bytes or
    FileSlice}, "json" (and "txt") as bytes."""
    source = f"{where}:{key}"
    raw = members.get("json")
    if raw is None and "txt" not in members:
        report.skip(source, "record has no json", ", ".join(sorted(members)))
        return []
    try:
        meta = json.loads(raw) if raw is not None else {}
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        report.skip(source, f"bad record json ({exc})")
        return []
    texts = meta.get("texts")
    if not isinstance(texts, list) or not texts:  # other webdatasets: a caption in the json or a .txt
        text = meta.get("text", meta.get("caption"))
        if text is None and "txt" in members:
            text = bytes(members["txt"]).decode("utf-8", "replace")
        texts = [clean_text(text) or None]
    n = len(texts)
    sources = meta.get("sources") if isinstance(meta.get("sources"), list) and len(meta["sources"]) == n else [str(meta.get("source") or source)] * n
    positions = meta.get("positions")
    if not (isinstance(positions, list) and len(positions) == n and all(type(p) is int for p in positions)):
        positions = [None] * n
    split = meta.get("split") if meta.get("split") in SPLITS else None
    found = {kind: next(((e, members[e]) for e in exts if e in members), None) for kind, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS))}

    def bad(reason: str, what: str) -> list:
        for src in sources:
            report.skip(source, reason, what if src == source else f"{what} ({src})")
        return []

    wanted = [e for e in meta.get("media", []) if e not in members] if isinstance(meta.get("media"), list) else []
    if wanted:
        return bad(f"record incomplete (no .{wanted[0]} member)", source)
    for kind, hit in found.items():
        if hit is not None and check is not None:
            reason = check(hit[0], hit[1], f"{source}.{hit[0]}")
            if reason:
                return bad(reason, f"{source}.{hit[0]}")
    image = found["image"][1] if found["image"] else None
    audio = found["audio"][1] if found["audio"] else None
    if image is None and audio is None and not any(texts):
        return bad("record has no media and no text", source)
    group = str(meta.get("group") or key)
    return [(positions[i], Sample(group=group, source=str(sources[i]), image=image, audio=audio,
                                  text=None if texts[i] is None else str(texts[i]), split=split)) for i in range(n)]


def _sniffer(fh: Any) -> Check:
    """Listing check on an open shard: a member is whole and its first bytes match its extension."""
    end = fh.seek(0, os.SEEK_END)

    def check(ext: str, item: Any, what: str) -> str | None:
        kind = "image" if ext in IMAGE_EXTS else "audio"
        if item.offset + item.size > end:
            return f"{kind} truncated (the shard ends {item.offset + item.size - end} bytes early)"
        if not item.size:
            return f"empty {kind} file"
        fh.seek(item.offset)
        if not looks_like(ext, fh.read(16)):
            return "not a recognised image format" if kind == "image" else "cannot decode: unrecognised or corrupt audio data"
        return None

    return check


def decode_check(ext: str, item: Any, what: str) -> str | None:
    """Streaming check: the medium decodes fully."""
    try:
        data = item.read() if isinstance(item, FileSlice) else bytes(item)
        (image_ext if ext in IMAGE_EXTS else audio_ext)(data, what)
    except InputError as err:
        return err.reason
    return None


def _list_tar(path: Path, report: DataReport) -> list[tuple[int | None, Sample]]:
    """Every record of one tar, media as FileSlices; json members are read."""
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        report.skip(str(path), f"unreadable shard ({exc})")
        return []
    records: dict[str, dict[str, Any]] = {}
    with tf:
        try:
            for m in tf:
                if not m.isreg():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("__"):
                    continue
                stem, ext = base.split(".", 1)
                members = records.setdefault(m.name[: len(m.name) - len(base)] + stem, {})
                ext = ext.lower()
                if ext in ("json", "txt"):
                    members[ext] = tf.extractfile(m).read()
                else:
                    members[ext] = FileSlice(str(path), m.offset_data, m.size, m.name)
        except (tarfile.TarError, EOFError, OSError) as exc:
            report.skip(str(path), f"shard damaged ({exc})", f"{len(records)} records listed before the damage")
    out: list[tuple[int | None, Sample]] = []
    with open(path, "rb") as fh:
        check = _sniffer(fh)
        for key, members in records.items():
            out += record_samples(key, members, str(path), report, check=check)
    return out


@dataset_format("wds", over_spec=True)
def read_wds(where: str, report: DataReport) -> list[Sample]:
    """``wds:DIR`` and friends (shard_paths): the samples of every record, in source order."""
    found: list[tuple[int | None, Sample]] = []
    for path in shard_paths(where):
        found += _list_tar(path, report)
    if found and all(pos is not None for pos, _ in found):
        found.sort(key=lambda ps: ps[0])
    return [s for _, s in found]


# -- streaming -------------------------------------------------------------------------------

class ShardStream:
    """Streams the samples of a shard set with webdataset, one process's share of it.

    The shard order is shuffled per (seed, epoch); consumer ``c = rank * num_workers + worker``
    of ``world * num_workers`` takes shards c, c + C, c + 2C ... of that order, so the consumers
    of an epoch cover every shard exactly once. rank / world / worker / num_workers left as None
    are taken at iteration from RANK / WORLD_SIZE (or torch.distributed) and the DataLoader
    worker (``webdataset.utils.pytorch_worker_info``). Samples hold their media as bytes (read
    while streaming); ``verify`` decodes each one first, and bad records (corrupt media, no
    json, unreadable tar data) are skipped and counted in ``report``.

    ``state()`` after any sample is a small dict ({"epoch", "shard", "offset", ...}); a stream
    made with ``state=`` that dict continues with exactly the next sample (the shards before are
    not read; the current one is read up to the position). Iterating again continues too.
    """

    def __init__(self, spec: str, *, rank: int | None = None, world: int | None = None, worker: int | None = None,
                 num_workers: int | None = None, epoch: int | None = None, seed: int = 0, state: dict | None = None,
                 verify: bool = True, report: DataReport | None = None):
        self.spec = spec
        where = spec[len("wds:"):] if spec.startswith("wds:") else spec
        self.paths = [str(p) for p in shard_paths(where)]
        self._split = (rank, world, worker, num_workers)
        state = dict(state or {})
        if epoch is not None and "epoch" in state and state["epoch"] != epoch:
            raise DataError(f"ShardStream: state is of epoch {state['epoch']}, not {epoch}")
        if "seed" in state and state["seed"] != seed:
            raise DataError(f"ShardStream: state was saved with seed {state['seed']}, not {seed}")
        self.epoch = state.get("epoch", epoch or 0)
        self.seed, self.verify = seed, verify
        self.report = report if report is not None else DataReport()
        self._saved_split = state.get("split")
        self._shard, self._offset, self._consumed = int(state.get("shard", 0)), int(state.get("offset", 0)), int(state.get("consumed", 0))

    def split(self) -> tuple[int, int, int, int]:
        """(rank, world, worker, num_workers), the missing ones detected now."""
        import webdataset as wds

        auto = wds.utils.pytorch_worker_info()
        rank, world, worker, num_workers = (a if v is None else v for v, a in zip(self._split, auto))
        if not (0 <= rank < world and 0 <= worker < num_workers):
            raise DataError(f"ShardStream: need 0 <= rank < world and 0 <= worker < num_workers, got rank {rank} of {world}, worker {worker} of {num_workers}")
        return rank, world, worker, num_workers

    def shards(self) -> list[str]:
        """This consumer's shards for the epoch, in the order they are read."""
        rank, world, worker, num_workers = self.split()
        order = list(self.paths)
        random.Random(f"edge-glass shards:{self.seed}:{self.epoch}").shuffle(order)
        return order[rank * num_workers + worker::world * num_workers]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "split": list(self.split()), "shard": self._shard,
                "offset": self._offset, "consumed": self._consumed}

    def _handler(self, exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "shard")
        self.report.skip(where, f"unreadable shard data ({type(exn).__name__}: {exn.args[0] if exn.args else ''})")
        return True

    def __iter__(self) -> Iterator[Sample]:
        import webdataset as wds

        split = list(self.split())
        if self._saved_split is not None and self._saved_split != split:
            raise DataError(f"ShardStream: the state was saved by consumer {self._saved_split} (rank, world, worker, num_workers), "
                            f"not {split}: resume with the same split")
        shards = self.shards()
        if self._shard >= len(shards):
            return
        where = {u: i for i, u in enumerate(shards)}
        skip, current = self._offset, self._shard
        pipeline = wds.DataPipeline(wds.SimpleShardList(shards[current:]), wds.tarfile_to_samples(handler=self._handler))
        check = decode_check if self.verify else None
        for rec in pipeline:
            url = rec.pop("__url__", None)
            key = rec.pop("__key__")
            i = where.get(url, current)
            if i != current:
                current, skip = i, 0
                self._shard, self._offset = i, 0
            members = {k: v for k, v in rec.items() if not k.startswith("__")}
            for _, sample in record_samples(key, members, str(url), self.report, check):
                if skip:
                    skip -= 1
                    continue
                self._offset += 1
                self._consumed += 1
                yield sample


def iter_shards(spec: str, **kw: Any) -> Iterator[Sample]:
    """``iter(ShardStream(spec, **kw))``: rank=, world=, worker=, num_workers=, epoch=, seed=, state=, verify=, report=."""
    return iter(ShardStream(spec, **kw))


def torch_dataset(spec: str, **kw: Any):
    """A ``torch.utils.data.IterableDataset`` over ShardStream(spec, **kw): in a DataLoader each
    worker (and each rank) streams its own shards (leave rank / worker unset); batches are lists
    of Samples with ``collate_fn=list`` (or a collate of your own)."""
    global ShardDataset
    if "ShardDataset" not in globals():  # torch imported only here; a module-level class pickles (spawned workers)
        from torch.utils.data import IterableDataset

        class ShardDataset(IterableDataset):  # noqa: F811
            def __init__(self, spec: str, kw: dict[str, Any]):
                self.spec, self.kw = spec, kw

            def __iter__(self) -> Iterator[Sample]:
                return iter(ShardStream(self.spec, **self.kw))

        ShardDataset.__qualname__ = "ShardDataset"
    return ShardDataset(spec, kw)
