"""Image decoding: transparent PNGs (RGBA, LA, palette + tRNS, PIL inputs) are composited onto the
background instead of exposing the RGB hidden under alpha 0, and oversized images are refused."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from edge_glass.encoders.efficientnet import (
    EfficientNetLiteConfig,
    EfficientNetLiteEncoder,
)
from edge_glass.errors import InputError
from edge_glass.media import images
from edge_glass.media.images import open_image

SIZE = 32


def alpha_pattern() -> np.ndarray:
    """Columns 0-9 transparent, 10-19 half transparent (alpha 128), 20-31 opaque."""
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, :10] = 0
    alpha[:, 10:20] = 128
    return alpha


def rgba_png(visible: np.ndarray, hidden_seed: int, alpha: np.ndarray) -> bytes:
    """PNG whose RGB is ``visible`` where alpha > 0 and random noise where alpha == 0."""
    rgb = np.random.default_rng(hidden_seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rgb[alpha > 0] = visible[alpha > 0]
    return png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def visible() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def test_rgba_png_composites_onto_white_and_blends_partial_alpha(tmp_path, visible):
    alpha = alpha_pattern()
    path = tmp_path / "t.png"
    path.write_bytes(rgba_png(visible, hidden_seed=1, alpha=alpha))
    out = np.asarray(open_image(path)).astype(int)
    assert (out[:, :10] == 255).all()  # hidden noise is gone
    expected = (visible[:, 10:20].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(out[:, 10:20] - expected).max() <= 1
    assert (out[:, 20:] == visible[:, 20:]).all()


def test_background_colour_is_configurable(visible):
    data = rgba_png(visible, hidden_seed=1, alpha=alpha_pattern())
    out = np.asarray(open_image(data, background=(0, 64, 200)))
    assert (out[:, :10] == [0, 64, 200]).all()


def test_la_and_palette_transparency_hide_the_stored_colour():
    la = Image.fromarray(np.dstack([np.full((4, 4), 17, np.uint8), np.zeros((4, 4), np.uint8)]), "LA")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), index 1 blue
    pal.putpixel((3, 3), 1)
    for img in (la, pal):
        kwargs = {"transparency": 0} if img.mode == "P" else {}
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kwargs)
        out = np.asarray(open_image(buf.getvalue()))
        assert (out[:3, :3] == 255).all(), img.mode
    assert tuple(np.asarray(open_image(buf.getvalue()))[3, 3]) == (0, 0, 255)


def test_pil_rgba_input_is_composited(visible):
    img = Image.open(io.BytesIO(rgba_png(visible, hidden_seed=2, alpha=alpha_pattern())))
    assert img.mode == "RGBA"
    assert (np.asarray(open_image(img))[:, :10] == 255).all()


def test_hidden_rgb_under_alpha_does_not_change_encoder_inputs(visible):
    enc = EfficientNetLiteEncoder(EfficientNetLiteConfig())
    a, b = (rgba_png(visible, hidden_seed=s, alpha=alpha_pattern()) for s in (1, 2))
    assert a != b
    ta, tb = enc.prepare(a), enc.prepare(b)
    assert ta.shape == (3, 224, 224) and torch.equal(ta, tb)


def test_encoder_background_is_in_the_fingerprint_and_used_by_prepare(visible):
    white = EfficientNetLiteEncoder(EfficientNetLiteConfig())
    black = EfficientNetLiteEncoder(EfficientNetLiteConfig(background=(0, 0, 0)))
    assert white.preprocessing()["background"] == [255, 255, 255]
    assert black.preprocessing()["background"] == [0, 0, 0]
    assert white.cache_id() != black.cache_id()  # the feature cache keeps them apart
    data = rgba_png(visible, hidden_seed=1, alpha=alpha_pattern())
    assert not torch.equal(white.prepare(data), black.prepare(data))
    with pytest.raises(ValueError):
        EfficientNetLiteConfig(background=(0, 0, 256))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims ``width`` x ``height`` (its pixel data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(9000, 8000), (30000, 30000)])  # 72 MP; 900 MP (over PIL's own limit)
def test_images_over_the_pixel_limit_are_refused_before_decoding(width, height):
    with pytest.raises(InputError, match="image too large"):
        open_image(png_header(width, height))


def test_pixel_limit_is_the_module_constant(monkeypatch):
    data = png(Image.new("RGB", (20, 20), (1, 2, 3)))
    assert open_image(data).size == (20, 20)
    monkeypatch.setattr(images, "MAX_PIXELS", 399)
    with pytest.raises(InputError, match=r"image too large \(20x20"):
        open_image(data)
