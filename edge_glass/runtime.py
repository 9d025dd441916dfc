"""Run an exported model (``edge-glass export RUN --out DIR``) with onnxruntime + numpy: no torch,
no training code. Besides onnxruntime it needs numpy and pillow (images), tokenizers (text) and
soundfile + scipy (audio), and imports only Edge Glass's torch-free ``media`` helpers, the same
image / audio decoding and preprocessing code the PyTorch encoders use.

    from edge_glass.runtime import ExportedModel
    m = ExportedModel("export/quickstart")        # precision="auto": int8 towers where the export shipped them
    img = m.encode_images(["photo.jpg", pil_image])  # (2, D) float32, unit rows (D: the export's dim)
    txt = m.encode_texts(["a dog on a beach"], dim=64)   # any dim up to D (Matryoshka prefix)
    scores = img @ txt.T

Bad inputs raise ``edge_glass.errors.InputError`` naming the file or text, as training does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import EdgeGlassError, InputError
from .media.audio import load_audio, whisper_clip_frames, whisper_log_mel
from .media.images import open_image
from .media.transforms import image_array

MANIFEST = "edge_glass_export.json"
RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image resampling codes


def unit_rows(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """The first ``dim`` columns of (N, D) rows, L2-normalised (a Matryoshka prefix)."""
    x = np.asarray(x, dtype=np.float32)[:, :dim]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _size(modality: str, item: Any) -> int:
    """A cheap length of a text, or of an audio input's encoded bytes (for batching similar sizes together)."""
    if modality == "text" or isinstance(item, (bytes, bytearray)):
        return len(item) if isinstance(item, (str, bytes, bytearray)) else 0
    try:
        return os.path.getsize(item)
    except (OSError, TypeError, ValueError):
        return 0  # a bad path: prepare() names it


class ExportedModel:
    """The towers of an export directory. ``precision``: "auto" (int8 where the export shipped
    an int8 graph, else fp32), "fp32", or "int8" (an error for towers without one).
    ``threads``: onnxruntime intra-op threads (None: its default, one per physical core)."""

    def __init__(self, path: str | Path, precision: str = "auto", threads: int | None = None):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise EdgeGlassError(f"{self.path}: not an Edge Glass export (no {MANIFEST}; write one with `edge-glass export RUN --out DIR`)")
        self.manifest = json.loads(file.read_text())
        if precision not in ("auto", "fp32", "int8"):
            raise EdgeGlassError(f"precision {precision!r}: use auto, fp32 or int8")
        self.precision, self.threads = precision, threads
        self._sessions: dict[str, Any] = {}
        self._tokenizer = None
        self._filters: np.ndarray | None = None

    # -- what the export holds -----------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["towers"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def tower(self, modality: str) -> dict[str, Any]:
        if modality not in self.manifest["towers"]:
            raise EdgeGlassError(f"{self.path}: this export has no {modality} tower (it has {', '.join(self.modalities)})")
        return self.manifest["towers"][modality]

    def file(self, modality: str) -> str:
        """The graph ``encode`` runs for a modality, following ``precision``."""
        tower = self.tower(modality)
        int8 = tower.get("int8", {})
        if self.precision == "int8":
            if not int8.get("shipped"):
                raise EdgeGlassError(f"{self.path}: the {modality} tower has no int8 graph ({int8.get('why_not', 'exported without --int8')})")
            return int8["file"]
        return int8["file"] if self.precision == "auto" and int8.get("shipped") else tower["file"]

    def input_names(self, modality: str) -> list[str]:
        return list(self.tower(modality)["inputs"])

    def session(self, modality: str, file: str | None = None):
        import onnxruntime as ort

        file = file or self.file(modality)
        if file not in self._sessions:
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[file] = ort.InferenceSession(str(self.path / file), options, providers=["CPUExecutionProvider"])
        return self._sessions[file]

    # -- preprocessing -------------------------------------------------------------------------
    def prepare(self, modality: str, items: list[Any]) -> tuple[np.ndarray, ...]:
        """Raw inputs -> the tower's input arrays (what the graph is fed)."""
        pre = self.tower(modality)["preprocess"]
        if modality == "image":
            return (self._images(items, pre),)
        if modality == "text":
            return self._texts(items, pre)
        if modality == "audio":
            return self._audio(items, pre)
        raise EdgeGlassError(f"no preprocessing for modality {modality!r}")

    @staticmethod
    def _images(items: list[Any], pre: dict[str, Any]) -> np.ndarray:
        background = tuple(pre["background"])
        return np.stack([image_array(open_image(it, background), pre["size"], pre["mean"], pre["std"], pre["resize"],
                                     RESAMPLE[pre.get("resample", "bicubic")]) for it in items])

    def _texts(self, items: list[Any], pre: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        for it in items:
            if not isinstance(it, str):
                raise InputError(repr(it)[:80], f"text input must be a string, got {type(it).__name__}")
            if not it.strip():
                raise InputError(repr(it), "empty text")
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path / pre["tokenizer"]))
            tok.enable_truncation(pre["max_length"])
            tok.enable_padding(pad_id=pre["pad_id"], pad_token=pre["pad_token"])
            self._tokenizer = tok
        encoded = self._tokenizer.encode_batch(items)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        return ids, mask

    def _audio(self, items: list[Any], pre: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if self._filters is None:
            self._filters = np.load(self.path / pre["mel_filters"])
        mels, frames, pads = [], [], []
        for it in items:
            audio = load_audio(it, pre["sr"], max_seconds=pre["max_seconds"])
            f = min(whisper_clip_frames(len(audio)), pre["max_frames"])
            width = f + 2 if pre["variable_length"] else pre["max_frames"]
            mel, pad = whisper_log_mel(audio, self._filters, width, pre["max_frames"])
            mels.append(mel), frames.append(f), pads.append(pad)
        width = max(m.shape[1] for m in mels)
        batch = np.stack([np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=p) for m, p in zip(mels, pads)])
        return batch.astype(np.float32), np.array(frames, dtype=np.int64)

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, modality: str, items: Iterable[Any], dim: int | None = None, batch_size: int | None = None,
               file: str | None = None) -> np.ndarray:
        """(N, dim) float32 unit rows, any dim up to the export's (a Matryoshka prefix)."""
        dim = self.dim if dim is None else dim
        if not 1 <= dim <= self.dim:
            raise EdgeGlassError(f"dim {dim}: outside 1..{self.dim} (this export was written at dim {self.dim})")
        items = list(items)
        if not items:
            return np.zeros((0, dim), np.float32)
        bs = batch_size or self.tower(modality)["preprocess"].get("batch_size", 32)
        session, names = self.session(modality, file), self.input_names(modality)
        order = list(range(len(items)))
        if modality in ("text", "audio"):  # similar lengths together: less padding (a row does not depend on its batch)
            order.sort(key=lambda i: _size(modality, items[i]))
        out = np.zeros((len(items), self.dim), np.float32)
        for s in range(0, len(items), bs):
            idx = order[s : s + bs]
            inputs = self.prepare(modality, [items[i] for i in idx])
            out[idx] = session.run(None, dict(zip(names, inputs)))[0]
        return unit_rows(out, dim)

    def encode_images(self, images: Iterable[Any], dim: int | None = None) -> np.ndarray:
        """Paths, bytes or PIL images -> (N, dim)."""
        return self.encode("image", images, dim)

    def encode_texts(self, texts: Iterable[str], dim: int | None = None) -> np.ndarray:
        return self.encode("text", texts, dim)

    def encode_audio(self, clips: Iterable[Any], dim: int | None = None) -> np.ndarray:
        """Audio file paths or bytes -> (N, dim)."""
        return self.encode("audio", clips, dim)
