"""Atomic file writes: write a temporary sibling, fsync it, rename it over the target, fsync the
folder. A reader (or a run killed at any moment) sees the old file or the new one, never a torn
one; a failed write (full or read-only disk) removes its temporary file and raises an
EdgeGlassError that names the target.

    atomic_write_text(path, text)                 atomic_write_bytes(path, data)
    atomic_write_json(path, obj)                  with atomic_path(path) as tmp: save_file(..., tmp)
    atomic_dir(path) as tmp: fill tmp/, then it becomes path
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save

from .errors import EdgeGlassError


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. folders cannot be opened on some platforms
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_error(path: Path, exc: OSError) -> EdgeGlassError:
    """An OSError while writing ``path`` as a one-line, actionable error."""
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
    return EdgeGlassError(f"{path}: cannot write ({what})")


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(root)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path to write; on success it is fsync'ed and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success its files are fsync'ed and it is renamed to
    ``path`` (an existing ``path`` is replaced when ``replace``, else the new folder is dropped:
    another process finished first). On failure the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_write_safetensors(path: str | os.PathLike, state: dict, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, safetensors_bytes(state, metadata))


def safetensors_bytes(state: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A state dict serialised in memory, so that writing it to disk is plain file I/O: a full or
    read-only disk then raises OSError with its errno (safetensors' own writer raises an opaque
    SafetensorError instead)."""
    return save(tensors_for_saving(state), metadata)


def tensors_for_saving(state: dict) -> dict:
    """Detached, contiguous CPU tensors; tied weights (one storage under two names, e.g. shared
    input/output embeddings) are stored as separate copies, which load back into the tie."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out
