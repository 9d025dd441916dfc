"""Shared fixtures: real data from ../shared/data (or $EDGE_GLASS_DATA), a per-session feature
cache, and real small models (loaded once per session)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """A fresh cache root per test session (unless EDGE_GLASS_TEST_CACHE names one to reuse)."""
    path = os.environ.get("EDGE_GLASS_TEST_CACHE") or str(tmp_path_factory.mktemp("edge_glass_cache"))
    old = os.environ.get("EDGE_GLASS_CACHE")
    os.environ["EDGE_GLASS_CACHE"] = path
    yield Path(path)
    if old is None:
        os.environ.pop("EDGE_GLASS_CACHE", None)
    else:
        os.environ["EDGE_GLASS_CACHE"] = old


@pytest.fixture(scope="session")
def data_root() -> Path:
    from edge_glass.paths import data_root as root

    path = root()
    if not (path / "coco1k" / "captions.json").is_file():
        pytest.skip(f"real data not found at {path} (set EDGE_GLASS_DATA to the shared data folder)")
    return path


def coco_first(data_root: Path, n: int, out: Path) -> Path:
    """A COCO-format dataset in ``out`` of the first ``n`` coco1k images (symlinked) and their captions."""
    src = json.loads((data_root / "coco1k" / "captions.json").read_text())
    images = src["images"][:n]
    ids = {im["id"] for im in images}
    (out / "images").mkdir()
    for im in images:
        os.symlink(data_root / "coco1k" / "images" / im["file_name"], out / "images" / im["file_name"])
    anns = [a for a in src["annotations"] if a["image_id"] in ids]
    (out / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return out


@pytest.fixture(scope="session")
def coco_subset(data_root, tmp_path_factory) -> Path:
    """A COCO-format dataset of the first 48 coco1k images (real photos and captions)."""
    return coco_first(data_root, 48, tmp_path_factory.mktemp("coco48"))


@pytest.fixture(scope="session")
def image_encoder():
    from edge_glass.encoders.efficientnet import EfficientNetLiteConfig, EfficientNetLiteEncoder

    return EfficientNetLiteEncoder(EfficientNetLiteConfig()).ensure_loaded()


@pytest.fixture(scope="session")
def text_encoder():
    from edge_glass.encoders.text import SentenceTransformerConfig, SentenceTransformerEncoder

    return SentenceTransformerEncoder(SentenceTransformerConfig()).ensure_loaded()


def copy_images(data_root: Path, dest: Path, n: int) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted((data_root / "coco1k" / "images").iterdir())[:n]
    return [Path(shutil.copy(f, dest / f.name)) for f in files]


@pytest.fixture(scope="session")
def fsdd_subset(data_root, tmp_path_factory) -> Path:
    """FSDD recordings of two speakers, all ten digits, takes 0-1 (official test) and 5-6 (train)."""
    src = data_root / "fsdd" / "recordings"
    if not src.is_dir():
        pytest.skip(f"FSDD not found at {src} (set EDGE_GLASS_DATA to the shared data folder)")
    out = tmp_path_factory.mktemp("fsdd") / "recordings"
    out.mkdir()
    for speaker in ("george", "jackson"):
        for digit in range(10):
            for take in (0, 1, 5, 6):
                name = f"{digit}_{speaker}_{take}.wav"
                os.symlink(src / name, out / name)
    return out.parent


def in_ci() -> bool:
    """CI=true (or 1 / yes), as scripts/check_system_deps.sh reads it: a missing system dependency fails."""
    return os.environ.get("CI", "").lower() in {"true", "1", "yes"}


@pytest.fixture(scope="session")
def espeak() -> str:
    """Path of espeak-ng (spoken-caption synthesis). Where it is not installed the tests that need
    it skip, except under CI=true, where they fail: CI must not go green with them all skipped."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        message = ("missing system dependency espeak-ng, needed for speech synthesis "
                   "(apt-get install espeak-ng; scripts/setup.sh does it)")
        if in_ci():
            pytest.fail(f"{message}; CI=true makes this a failure, not a skip", pytrace=False)
        pytest.skip(message)
    return exe
