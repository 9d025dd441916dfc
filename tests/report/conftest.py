"""Session-scoped tiny runs on real data shared by the report and notebook tests (trained once),
and a headless Chromium to look at the pages as a person would."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import coco_first, in_ci  # tests/ is on sys.path


def train_run(cfg: dict, out: Path) -> Path:
    from edge_glass.config import config_from_dict
    from edge_glass.train.loop import train

    train(config_from_dict(cfg, "test"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def coco8(data_root, tmp_path_factory) -> Path:
    """A COCO-format dataset of the first 8 coco1k images (40 real captions)."""
    return coco_first(data_root, 8, tmp_path_factory.mktemp("coco8"))


@pytest.fixture(scope="session")
def aligned_run(coco_subset, tmp_path_factory) -> Path:
    """Image-text alignment (mean pooling, dims 64/32) on 48 coco1k images, 2 epochs."""
    cfg = {
        "name": "report_tiny",
        "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
        "model": {"dims": [64, 32]},
        "data": {"train": [f"coco:{coco_subset}"], "split": {"val": 4, "test": 12}},
        "train": {"epochs": 2, "batch_size": 16, "checkpoint_every": 100, "log_every": 2, "threads": 1},
    }
    return train_run(cfg, tmp_path_factory.mktemp("report_runs") / "aligned")


@pytest.fixture(scope="session")
def trm_run(tmp_path_factory) -> Path:
    """A TRM decoder (halting on) on the first 160 easy-VQA questions of each official split."""
    pytest.importorskip("easy_vqa")
    cfg = {
        "task": "vlm", "name": "report_trm",
        "projector": {"pool": "mean", "hidden": 64},
        "decoder": {"type": "trm", "d_model": 32, "n_layers": 1, "n_heads": 2, "n": 1, "T": 1, "n_sup": 2, "halting": True},
        "data": {"train": ["easy-vqa"], "max_samples": 160, "val": 0.1},
        "train": {"epochs": 2, "batch_size": 32, "lr": 2.0e-3, "threads": 1, "checkpoint_every": 100, "log_every": 2},
        "eval": {"max_new_tokens": 3, "samples": 4},
    }
    return train_run(cfg, tmp_path_factory.mktemp("report_runs") / "trm")


@pytest.fixture(scope="session")
def spoken8(espeak, coco8, tmp_path_factory) -> Path:
    """The 40 captions of coco8 spoken by espeak-ng: an image-audio-text JSONL manifest."""
    from edge_glass.cli import main

    out = tmp_path_factory.mktemp("spoken8")
    assert main(["speak", f"coco:{coco8}", "--out", str(out), "--format", "wav"]) == 0
    return out / "manifest.jsonl"


@pytest.fixture(scope="session")
def tri_run(spoken8, fsdd_subset, tmp_path_factory) -> Path:
    """Images, speech and text: spoken coco8 captions (triples) + FSDD digits (audio-text)."""
    cfg = {
        "name": "report_tri",
        "encoders": {"image": {"type": "efficientnet_lite"}, "audio": {"type": "whisper", "batch_size": 8},
                     "text": {"type": "sentence_transformer"}},
        "model": {"dims": [32, 16]},
        "data": {"train": [f"jsonl:{spoken8}", f"fsdd:{fsdd_subset}"], "split": {"val": 1, "test": 3}},
        "train": {"epochs": 2, "batch_size": 16, "log_every": 2, "threads": 1, "checkpoint_every": 100},
    }
    return train_run(cfg, tmp_path_factory.mktemp("report_runs") / "tri")


def _chromium() -> tuple[str | None, str | None]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's chromium + chromium-driver) driven by selenium. Missing: the
    test skips, except under CI=true, where it fails (scripts/check_system_deps.sh installs it)."""
    binary, driver = _chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        binary = None
    if binary is None or driver is None:
        message = "missing system dependency chromium / chromium-driver (or selenium), needed to render report.html (apt-get install chromium chromium-driver)"
        if in_ci():
            pytest.fail(f"{message}; CI=true makes this a failure, not a skip", pytrace=False)
        pytest.skip(message)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--hide-scrollbars", "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(driver))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
