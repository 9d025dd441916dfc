"""Small builders shared by the end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import yaml


def write_config(path: Path, coco_dir: Path, **train) -> Path:
    """A tiny image-text alignment config (Perceiver image head, dims 64/32) on a COCO-format folder."""
    cfg = {
        "name": "tiny",
        "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
        "model": {"dims": [64, 32], "heads": {"image": {"pooler": {"type": "perceiver", "dim": 64, "latents": 8, "depth": 1, "heads": 4}}}},
        "data": {"train": [f"coco:{coco_dir}"], "split": {"val": 4, "test": 8}},
        "train": {"epochs": 3, "batch_size": 16, "checkpoint_every": 5, "log_every": 3, "threads": 1, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
