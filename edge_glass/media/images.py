"""Image decoding with errors that name the file: a corrupt, missing or oversized image raises
InputError. Transparent images are composited onto a background colour (white by default)
instead of exposing whatever colours their transparent pixels happen to store."""
from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .files import read_bytes

MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs); 64 MP covers real photos
WHITE = (255, 255, 255)


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
    return read_bytes(item, "image")


def has_alpha(img: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA, ...) or a transparency entry (palette or colour-key tRNS)."""
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """RGB copy of ``img``; transparent and partly transparent pixels are blended onto ``background``."""
    if not has_alpha(img):
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def open_image(item: Any, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Decode a path, bytes or PIL image into an RGB PIL image (fully loaded), transparency
    composited onto ``background``; images over MAX_PIXELS are refused before decoding."""
    if isinstance(item, Image.Image):
        return to_rgb(item, background)
    data = image_bytes(item)
    if not data:
        raise InputError(describe_image(item), "empty image file")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise InputError(describe_image(item), too_large(f"{w}x{h} = {w * h / 1e6:.0f} MP"))
        img.load()  # force full decode: truncated files fail here, not later
        return to_rgb(img, background)
    except UnidentifiedImageError:
        raise InputError(describe_image(item), "not a recognised image format") from None
    except Image.DecompressionBombError:  # PIL's own (higher) limit, hit in Image.open
        raise InputError(describe_image(item), too_large(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP")) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(describe_image(item), f"corrupt image ({exc})") from None


def too_large(size: str) -> str:
    return f"image too large ({size}; the limit is {MAX_PIXELS / 1e6:.0f} MP, edge_glass.media.images.MAX_PIXELS)"
