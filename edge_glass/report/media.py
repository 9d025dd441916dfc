"""Thumbnails (downscaled JPEG data: URIs) and embeddable audio clips for the report page."""
from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..errors import InputError
from ..media.audio import audio_bytes, load_audio
from ..media.images import open_image
from .html import data_uri

MAX_EMBEDDED_AUDIO = 400_000  # bytes; a longer clip is re-encoded as 16 kHz mono WAV, at most 20 s
EXTENSIONS = {"audio/wav": "wav", "audio/ogg": "ogg", "audio/flac": "flac", "audio/mpeg": "mp3"}


def thumbnail(item: Any, size: int = 96):
    """A PIL image downscaled so its longer side is ``size`` (aspect kept); None if undecodable."""
    try:
        img = open_image(item)
    except (InputError, OSError, ValueError):
        return None
    img.thumbnail((size, size))
    return img


def _key(item: Any) -> Any:
    return item if isinstance(item, (str, bytes)) else id(item)


def _jpeg_uri(item: Any, size: int) -> str | None:
    img = thumbnail(item, size)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")


_thumb_uri = lru_cache(maxsize=4096)(_jpeg_uri)  # paths and bytes are hashable: encode each once


def image_uri(item: Any, size: int = 96) -> str | None:
    """A JPEG data: URI of the item (path or bytes) downscaled to ``size`` px; None if undecodable."""
    return _thumb_uri(item, size) if isinstance(item, (str, bytes)) else _jpeg_uri(item, size)


def audio_mime(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[:4] == b"OggS":
        return "audio/ogg"
    if data[:4] == b"fLaC":
        return "audio/flac"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    return None


class MediaDir:
    """Audio clips beside the page (DIR/media/, each clip once, named by its content hash), played
    by <audio src="media/..."> from disk. A long or unusual clip is re-encoded as 16 kHz mono WAV
    (at most 20 s)."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "media"
        self.names: dict[Any, str | None] = {}

    def audio(self, item: Any) -> str | None:
        """The clip's path relative to the page; None if it cannot be read."""
        key = _key(item)
        if key not in self.names:
            self.names[key] = self._write(item)
        return self.names[key]

    def _write(self, item: Any) -> str | None:
        try:
            data = audio_bytes(item)
        except InputError:
            return None
        mime = audio_mime(data)
        if mime is None or len(data) > MAX_EMBEDDED_AUDIO:
            try:
                import soundfile as sf

                wave = load_audio(item, sr=16000, max_seconds=20.0)
                buf = io.BytesIO()
                sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
                data, mime = buf.getvalue(), "audio/wav"
            except (InputError, OSError, ValueError, RuntimeError):
                return None
        name = f"{hashlib.sha1(data).hexdigest()[:16]}.{EXTENSIONS[mime]}"
        path = self.dir / name
        if not path.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        return f"media/{name}"
