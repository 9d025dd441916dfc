"""Where data and caches live; both overridable by environment variables.

EDGE_GLASS_DATA   root for relative dataset paths (default: ../shared/data beside the project)
EDGE_GLASS_CACHE  feature cache, converted weights, digests (default: ~/.cache/edge_glass)
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_GLASS_CACHE", Path.home() / ".cache" / "edge_glass")).expanduser()


def data_root() -> Path:
    env = os.environ.get("EDGE_GLASS_DATA")
    if env:
        return Path(env).expanduser()
    for cand in (Path.cwd() / ".." / "shared" / "data", PROJECT_ROOT / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return (PROJECT_ROOT / ".." / "shared" / "data").resolve()


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A dataset path as given, else relative to the data root (``coco1k`` -> $EDGE_GLASS_DATA/coco1k)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    cand = data_root() / p
    return cand if cand.exists() else p
