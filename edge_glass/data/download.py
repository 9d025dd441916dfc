"""Image URL downloads for URL datasets (PixMo-style parquet), cached under
``<cache root>/downloads`` so a re-run fetches only what is missing.

Each URL is tried up to ``tries`` times with exponential backoff when the failure is transient
(timeout, connection error, HTTP 5xx/408/429); permanent failures (other HTTP errors, bytes that
do not decode as an image) are not retried. Every failure comes back as a reason
("image URL failed: HTTP 404"). There is no give-up on a host that answers: only while no host
has answered at all and ``offline_hosts`` distinct hosts (host:port) could not be reached is the
network taken as down, and the remaining URLs are skipped at once with a reason that says so.

``download_shards`` (``edge-glass download parquet:FILE --out DIR``) fetches a URL table straight
into webdataset shards (the layout of shards.py): shard k holds rows [k * N, (k + 1) * N) of the
table, its URLs fetched in parallel, images whose longest side exceeds ``image_size`` resized to
it and re-encoded as JPEG (smaller ones kept byte for byte); a finished shard is never fetched
again, so a re-run (after a kill, a full disk...) fetches only the missing shards. Every failed row
is in DIR/failures.jsonl with its reason and counted in DIR/index.json. With no network at all
(no host answers) it stops at once with an error and writes nothing more.

Settings come from the environment: EDGE_GLASS_DOWNLOAD_WORKERS (parallel downloads, 8),
EDGE_GLASS_DOWNLOAD_TIMEOUT (seconds per socket operation, 10), EDGE_GLASS_DOWNLOAD_TRIES (3),
EDGE_GLASS_DOWNLOAD_BACKOFF (seconds before the first retry, doubling, 0.5).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..errors import DataError, InputError
from ..media.files import read_bytes
from ..media.images import open_image
from ..paths import cache_root

MAX_BYTES = 64 * 2**20
USER_AGENT = "edge-glass/0.1 (dataset image download)"
RETRY_HTTP = {408, 425, 429}  # plus every 5xx
OFFLINE = ("image URL not downloaded: the network looks unreachable (offline?; no host answered)"
           "; pre-download images and use local paths")

Result = tuple[Path | None, str]  # (cached file, "") or (None, reason)


class Transient(Exception):
    """A failure worth retrying; ``conn`` marks "could not reach the host at all"."""

    def __init__(self, what: str, conn: bool = False):
        super().__init__(what)
        self.conn = conn


class Permanent(Exception):
    """A failure that another try would repeat (HTTP 404, not an image)."""


class Offline(Exception):
    """No host has answered and several could not be reached: not tried."""


def _env(name: str, default: float, cast: type = float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise DataError(f"{name}={raw!r}: expected a number") from None
    if value <= 0:
        raise DataError(f"{name}={raw!r}: must be positive")
    return value


@dataclass
class UrlFetcher:
    """Downloads image URLs into the cache; ``fetch_all`` in parallel, ``get`` one."""

    workers: int = 8
    timeout: float = 10.0  # per socket operation (connect, each read)
    tries: int = 3
    backoff: float = 0.5
    deadline: float = 120.0  # most seconds one attempt may take in all (slow trickles)
    offline_hosts: int = 3
    cache_dir: Path | None = None

    @classmethod
    def from_env(cls) -> UrlFetcher:
        return cls(workers=int(_env("EDGE_GLASS_DOWNLOAD_WORKERS", 8, int)),
                   timeout=_env("EDGE_GLASS_DOWNLOAD_TIMEOUT", 10.0),
                   tries=int(_env("EDGE_GLASS_DOWNLOAD_TRIES", 3, int)),
                   backoff=_env("EDGE_GLASS_DOWNLOAD_BACKOFF", 0.5))

    def __post_init__(self) -> None:
        self.dir = Path(self.cache_dir) if self.cache_dir else cache_root() / "downloads"
        self._lock = threading.Lock()
        self._answered = False  # some host sent an HTTP response
        self._unreachable: set[str] = set()  # hosts that could not be reached after every try

    def path_for(self, url: str) -> Path:
        suffix = Path(urllib.parse.urlsplit(url).path).suffix
        suffix = suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""
        return self.dir / (hashlib.sha1(url.encode()).hexdigest() + suffix)

    def fetch_all(self, urls: Iterable[str]) -> dict[str, Result]:
        """Each distinct URL's result, downloaded in parallel (cached ones are not fetched)."""
        unique = list(dict.fromkeys(urls))
        with ThreadPoolExecutor(max_workers=max(1, self.workers), thread_name_prefix="edge-glass-download") as pool:
            return dict(zip(unique, pool.map(self.get, unique)))

    def get(self, url: str) -> Result:
        """One URL: its cached file, downloading (with retries) and checking it first if needed."""
        dest = self.path_for(url)
        if dest.is_file():
            return dest, ""
        data, reason = self.download(url)
        if data is None:
            return None, reason
        try:
            open_image(data)
        except InputError as exc:
            return None, not_an_image(exc)
        atomic_write_bytes(dest, data)
        return dest, ""

    def download(self, url: str) -> tuple[bytes | None, str]:
        """One URL's body (with retries; not cached, not checked), or (None, reason)."""
        try:
            return self._with_retries(url), ""
        except Offline:
            return None, OFFLINE
        except (Permanent, Transient) as exc:
            return None, f"image URL failed: {exc}"

    @property
    def answered(self) -> bool:
        """Whether any host has sent an HTTP response yet."""
        with self._lock:
            return self._answered

    def _with_retries(self, url: str) -> bytes:
        tries = max(1, self.tries)
        for attempt in range(1, tries):
            if self._offline():
                raise Offline
            try:
                return self._download(url)
            except Transient:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        if self._offline():
            raise Offline
        try:
            return self._download(url)
        except Transient as exc:
            if exc.conn:
                with self._lock:
                    self._unreachable.add(urllib.parse.urlsplit(url).netloc)
            raise Transient(f"{exc} after {tries} {'try' if tries == 1 else 'tries'}") from None

    def _offline(self) -> bool:
        with self._lock:
            return not self._answered and len(self._unreachable) >= self.offline_hosts

    def _download(self, url: str) -> bytes:
        """The response body; raises Transient or Permanent with a short reason."""
        quoted = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")
        req = urllib.request.Request(quoted, headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                with self._lock:
                    self._answered = True
                return _read_body(resp, time.monotonic() + self.deadline)
        except urllib.error.HTTPError as exc:
            exc.close()
            with self._lock:
                self._answered = True
            if exc.code >= 500 or exc.code in RETRY_HTTP:
                raise Transient(f"HTTP {exc.code}") from None
            raise Permanent(f"HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise Transient("timed out") from None
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise Permanent(f"TLS certificate rejected ({reason.verify_message})") from None
            if isinstance(reason, OSError):
                raise Transient(_conn_reason(reason), conn=True) from None
            raise Permanent(f"bad URL ({reason})") from None
        except TimeoutError:
            raise Transient("timed out") from None
        except (HTTPException, ConnectionError) as exc:  # dropped mid-response
            raise Transient(f"connection lost ({type(exc).__name__})") from None
        except ValueError as exc:  # malformed URL
            raise Permanent(f"bad URL ({exc})") from None


def not_an_image(exc: InputError) -> str:
    """The failure reason of a downloaded body that is not a usable image."""
    what = "image too large" if exc.reason.startswith("image too large") else "not an image"
    return f"image URL failed: {what} ({exc.reason})"


def _read_body(resp, deadline: float) -> bytes:
    chunks, size = [], 0
    while chunk := resp.read(1 << 16):
        size += len(chunk)
        if size > MAX_BYTES:
            raise Permanent(f"larger than {MAX_BYTES >> 20} MB")
        if time.monotonic() > deadline:
            raise Transient("timed out")
        chunks.append(chunk)
    return b"".join(chunks)


def _conn_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"connection error ({exc.strerror or exc})"


# -- URL tables -> shards (edge-glass download) ---------------------------------------------

IMAGE_SIZE = 512  # longest side of the stored images (default of --image-size)
JPEG_QUALITY = 90
OFFLINE_ERROR = ("download: no image host could be reached (offline?); shard {shard} was not written. "
                 "Run the same command again when the network is back: finished shards are kept")


def fit_image(data: bytes, size: int, what: str) -> tuple[str, bytes]:
    """(extension, bytes) of an encoded image: as it is when its longest side is at most ``size``
    (0: any size), else resized to that longest side (Lanczos) and re-encoded as JPEG. Raises
    InputError when the bytes are not a usable image (corrupt, truncated, too large)."""
    from PIL import Image

    from .shards import IMAGE_FORMATS

    try:
        img = open_image(data)  # decodes fully (truncated files fail here); RGB, transparency on white
    except InputError as exc:
        raise InputError(what, exc.reason) from None
    w, h = img.size
    if not size or max(w, h) <= size:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
        return IMAGE_FORMATS.get(fmt, fmt.lower() or "img"), data
    scale = size / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", buf.getvalue()


def table_rows(path: Path) -> list[tuple[Path, int, Any, Any]]:
    """(file, row, image value, caption) of a parquet file or folder, as read_parquet reads them."""
    import pyarrow.parquet as pq

    from .formats import CAPTION_COLUMNS, IMAGE_COLUMNS

    rows: list[tuple[Path, int, Any, Any]] = []
    for file in sorted(path.glob("*.parquet")) if path.is_dir() else [path]:
        table = pq.read_table(file)
        cols = table.column_names
        img_col = next((c for c in IMAGE_COLUMNS if c in cols), None)
        cap_col = next((c for c in CAPTION_COLUMNS if c in cols), None)
        if img_col is None or cap_col is None:
            raise DataError(f"{file}: need an image column ({'/'.join(IMAGE_COLUMNS)}) and a caption column ({'/'.join(CAPTION_COLUMNS)}); found {cols}")
        for i, (img, cap) in enumerate(zip(table.column(img_col).to_pylist(), table.column(cap_col).to_pylist())):
            if isinstance(img, dict):  # Hugging Face datasets Image feature: {"bytes", "path"}
                img = img.get("bytes") or img.get("path")
            rows.append((file, i, img, cap))
    return rows


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _fetch_image(fetcher: UrlFetcher, item: Any, size: int) -> tuple[tuple[str, bytes] | None, str]:
    """One row's image, downloaded (URLs) or read, checked and fitted: ((ext, bytes), "") or (None, reason)."""
    if _is_url(item):
        data, reason = fetcher.download(item)
        if data is None:
            return None, reason
        try:
            return fit_image(data, size, item), ""
        except InputError as exc:
            return None, not_an_image(exc)
    try:
        data = item if isinstance(item, bytes) else read_bytes(item, "image")
        return fit_image(data, size, str(item) if not isinstance(item, bytes) else f"<image bytes, {len(item)} B>"), ""
    except InputError as exc:
        return None, exc.reason


def _shard_records(rows, first_row: int, k: int, fetcher: UrlFetcher, pool: ThreadPoolExecutor, size: int):
    """Shard k's encoded records (one per distinct image, with the captions of all its rows) and skips."""
    from .formats import clean_text
    from .shards import Record, record_key

    skipped: list[dict[str, Any]] = []
    records: dict[Any, Record] = {}
    for j, (file, i, img, cap) in enumerate(rows):
        row, source, text = first_row + j, f"{file} row {i}", clean_text(cap)

        def skip(reason: str, what: str = "") -> None:
            skipped.append({"source": source, "reason": reason, "input": what, "row": row, **({"url": img} if _is_url(img) else {})})

        if isinstance(img, (bytes, bytearray)):
            if not text or not img:
                skip("empty caption" if not text else "empty image bytes")
                continue
            ident, group, item = ("bytes", hashlib.sha1(img).hexdigest()), hashlib.sha1(img).hexdigest(), bytes(img)
        elif not isinstance(img, str) or not img:
            skip("no image value")
            continue
        elif _is_url(img):
            if not text:
                skip("empty caption", img)
                continue
            ident, group, item = ("url", img), img, img
        else:
            p = Path(img) if Path(img).is_absolute() else file.parent / img
            if not text or not p.is_file():
                skip("empty caption" if not text else "image file not found", str(p))
                continue
            ident, group, item = ("path", str(p)), img, str(p)
        rec = records.get(ident)
        if rec is None:
            rec = records[ident] = Record(record_key(row), group, None, image=item)
        rec.add(text, source, row)
    recs = list(records.values())
    results = list(pool.map(lambda r: _fetch_image(fetcher, r.image, size), recs))
    urls = [res for r, res in zip(recs, results) if _is_url(r.image)]
    if any(reason == OFFLINE for _, reason in urls) or (urls and not fetcher.answered and all(got is None for got, _ in urls)):
        raise DataError(OFFLINE_ERROR.format(shard=k))
    encoded = []
    for rec, (got, reason) in zip(recs, results):
        if got is None:
            url = {"url": rec.image} if _is_url(rec.image) else {}
            skipped += [{"source": src, "reason": reason, "input": str(rec.image) if not isinstance(rec.image, bytes) else "",
                         "row": row, **url} for src, row in zip(rec.sources, rec.positions)]
            continue
        ext, data = got
        encoded.append((rec.key, rec.meta([ext]), {ext: data}))
    skipped.sort(key=lambda f: f["row"])
    return encoded, skipped, sum(1 for r in recs if _is_url(r.image))


def download_shards(spec: str, out: str | os.PathLike, shard_size: int | None = None, image_size: int = IMAGE_SIZE,
                    fetcher: UrlFetcher | None = None, report=None, progress: bool = False) -> dict[str, Any]:
    """Fetch a URL table (``parquet:FILE`` or a folder of them) into shards in ``out``; returns
    index.json plus "written" / "kept" (shards this run wrote / found finished) and "fetched"
    (URLs it fetched)."""
    from tqdm.auto import tqdm

    from .formats import parse_spec
    from .samples import DataReport
    from .shards import SHARD_SIZE, ShardSetWriter

    shard_size = SHARD_SIZE if shard_size is None else shard_size
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1")
    if image_size < 0:
        raise DataError(f"--image-size {image_size}: must be 0 (keep every size) or more")
    report = report if report is not None else DataReport()
    kind, path = parse_spec(spec)
    if kind != "parquet":
        raise DataError(f"download {spec}: expected parquet:FILE (a table with an image URL column and a caption column)")
    rows = table_rows(path)
    if not rows:
        raise DataError(f"download {spec}: the table has no rows")
    digest = hashlib.sha1()
    for file, i, img, cap in rows:
        value = hashlib.sha1(img).hexdigest() if isinstance(img, (bytes, bytearray)) else str(img)
        digest.update(f"{file.name}\t{i}\t{value}\t{cap}\n".encode())
    settings = {"kind": "download", "source": spec, "shard_size": shard_size, "image_size": image_size, "rows": len(rows),
                "digest": digest.hexdigest()}
    writer = ShardSetWriter(out, settings)
    fetcher = fetcher if fetcher is not None else UrlFetcher.from_env()
    n_shards = math.ceil(len(rows) / shard_size)
    written = fetched = 0
    with ThreadPoolExecutor(max_workers=max(1, fetcher.workers), thread_name_prefix="edge-glass-download") as pool:
        for k in tqdm(range(n_shards), desc="download", unit="shard", disable=not progress, leave=False):
            if writer.done(k):
                continue
            lo = k * shard_size
            chunk = rows[lo:lo + shard_size]
            encoded, skipped, urls = _shard_records(chunk, lo, k, fetcher, pool, image_size)
            writer.write(k, encoded, skipped, rows=[lo, lo + len(chunk)])
            written, fetched = written + 1, fetched + urls
            for f in skipped:
                report.skip(f["source"], f["reason"], f["input"])
    index = writer.finish(n_shards, spec)
    return {**index, "written": written, "kept": n_shards - written, "fetched": fetched}
