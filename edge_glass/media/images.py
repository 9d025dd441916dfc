"""Image decoding with errors that name the file: a corrupt or missing image raises InputError."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import InputError

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # refuse decompression bombs, allow large photos


def describe_image(item: Any) -> str:
    if isinstance(item, (bytes, bytearray)):
        return f"<image bytes, {len(item)} B>"
    if isinstance(item, Image.Image):
        return f"<PIL image {item.size[0]}x{item.size[1]}>"
    return str(item)


def image_bytes(item: Any) -> bytes:
    """Raw encoded bytes of a path/bytes input (for content hashing); raises InputError if unreadable."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, Image.Image):
        return item.tobytes() + repr((item.size, item.mode)).encode()
    try:
        return Path(item).read_bytes()
    except FileNotFoundError:
        raise InputError(str(item), "image file not found") from None
    except OSError as exc:
        raise InputError(str(item), f"cannot read image file ({exc.strerror or exc})") from None


def open_image(item: Any) -> Image.Image:
    """Decode a path, bytes or PIL image into an RGB PIL image (fully loaded)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    data = image_bytes(item)
    if not data:
        raise InputError(describe_image(item), "empty image file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force full decode: truncated files fail here, not later
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(describe_image(item), "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(describe_image(item), f"corrupt image ({exc})") from None
