"""Image URL downloads for URL datasets (PixMo-style parquet), cached under
``<cache root>/downloads`` so a re-run fetches only what is missing.

Each URL is tried up to ``tries`` times with exponential backoff when the failure is transient
(timeout, connection error, HTTP 5xx/408/429); permanent failures (other HTTP errors, bytes that
do not decode as an image) are not retried. Every failure comes back as a reason
("image URL failed: HTTP 404"). There is no give-up on a host that answers: only while no host
has answered at all and ``offline_hosts`` distinct hosts (host:port) could not be reached is the
network taken as down, and the remaining URLs are skipped at once with a reason that says so.

Settings come from the environment: EDGE_GLASS_DOWNLOAD_WORKERS (parallel downloads, 8),
EDGE_GLASS_DOWNLOAD_TIMEOUT (seconds per socket operation, 10), EDGE_GLASS_DOWNLOAD_TRIES (3),
EDGE_GLASS_DOWNLOAD_BACKOFF (seconds before the first retry, doubling, 0.5).
"""
from __future__ import annotations

import hashlib
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

from ..atomic import atomic_write_bytes
from ..errors import DataError, InputError
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
        try:
            data = self._with_retries(url)
        except Offline:
            return None, OFFLINE
        except (Permanent, Transient) as exc:
            return None, f"image URL failed: {exc}"
        try:
            open_image(data)
        except InputError as exc:
            what = "image too large" if exc.reason.startswith("image too large") else "not an image"
            return None, f"image URL failed: {what} ({exc.reason})"
        atomic_write_bytes(dest, data)
        return dest, ""

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
