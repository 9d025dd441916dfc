"""Raw media -> the in-memory dataset NL-MM trains on (no frozen encoders, no feature cache).

``build_nlmm_data`` decodes every distinct image and every distinct audio clip once and keeps
small tensors in memory; ``NLMMData.batch`` gathers a batch from them.

Storage (``MediaStore``, shared by every ``select()`` view; nothing is copied per view):

  * images  ``(n_images, 3, S, S)`` uint8 RGB, resized (PIL bilinear) to ``MediaSpec.image_size``.
    Samples that show the same image (COCO: five captions per photo) point at one row.
  * mels    ``(total_frames, n_mels)`` float16: the log-mel spectrograms of all distinct clips
    concatenated along time; clip ``r`` is ``mels[mel_offsets[r]:mel_offsets[r + 1]]``.
  * tokens  ``(n_texts, L_max)`` int32 ``<bos> words <eos>`` right-padded with ``<pad>`` (0),
    ``token_lengths`` the length of each row including ``<bos>``/``<eos>``; distinct texts once.

Each sample has a row index into each table (``image_rows``, ``audio_rows``, ``text_rows``,
``-1`` where the sample lacks that modality); a view is just a subset of those row indices.

Batches always carry every key (image, audio and text, with masks), so every step and every
process sees the same structure. Absent images are zeros; audio is padded to the longest clip
of the batch with ``SILENCE`` (the log-mel of digital silence: the 1e-10 clamp floor after the
fixed normalisation, ``(log10(1e-10) + 4) / 4 = -1.5``); text is padded with ``<pad>`` (0).

Log-mel front end (``log_mel``): 16 kHz audio, 25 ms periodic Hann window every 10 ms (n_fft 400,
hop 160), centred frames (reflect padding), power spectrum, Slaney-style mel filterbank over
0-8 kHz (``transformers.audio_utils.mel_filter_bank``, as Whisper), ``log10`` clamped at 1e-10,
then the fixed affine ``(log + 4) / 4`` (Whisper's, without its per-clip dynamic-range clamp, so
clips and padding are comparable across batches).

Bad inputs are handled as in ``edge_glass.features.pipeline``: a sample whose image or audio
fails to decode (``InputError``: missing, corrupt, truncated...) is skipped and recorded in the
``DataReport`` (``report.skip(sample.source, error.reason, error.what)``, ``what`` naming the
file), and so is a sample whose text gives no tokens ("empty caption") or that has no usable
modality left; everything else is kept in its original order.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..data.samples import DataReport, Sample
from ..decoders.prompt import WordTokenizer
from ..errors import DataError, InputError
from ..media.audio import TARGET_SR, describe_audio, load_audio
from ..media.images import describe_image, open_image

__all__ = [
    "HOP", "N_FFT", "LOG_CLAMP", "SILENCE", "MediaSpec", "MediaStore", "NLMMData",
    "log_mel", "mel_filters", "build_nlmm_data", "text_vocabulary", "Backbones", "BackboneFeatures", "attach_features",
]

N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms at 16 kHz
LOG_CLAMP = 1e-10
SILENCE = (math.log10(LOG_CLAMP) + 4.0) / 4.0  # -1.5: log-mel of silence, and the audio padding value
PAD_ID = 0  # WordTokenizer.pad_id; the text padding when no tokenizer is given

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class MediaSpec:
    """How raw media become tensors."""

    image_size: int = 64  # images resized (bilinear, PIL) to image_size x image_size RGB
    n_mels: int = 40  # log-mel bins, 16 kHz audio, 25 ms Hann window every 10 ms
    max_audio_seconds: float = 6.0  # longer clips are cut (only the beginning is decoded)
    max_text_tokens: int = 32  # caption tokens kept (before <bos>/<eos>)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.n_mels < 1 or self.max_text_tokens < 1 or not self.max_audio_seconds > 0:
            raise ValueError(f"MediaSpec: sizes must be positive, got {self}")


# -- log-mel ------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def mel_filters(n_mels: int) -> np.ndarray:
    """(n_fft/2 + 1, n_mels) float64 Slaney mel filterbank over 0-8 kHz (Whisper's), built once."""
    from transformers.audio_utils import mel_filter_bank  # a slow import, only paid when audio is used

    filters = mel_filter_bank(N_FFT // 2 + 1, n_mels, 0.0, TARGET_SR / 2, TARGET_SR, norm="slaney", mel_scale="slaney")
    filters.setflags(write=False)
    return filters


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    from transformers.audio_utils import window_function

    window = window_function(N_FFT, "hann", periodic=True).astype(np.float64)
    window.setflags(write=False)
    return window


def log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """16 kHz mono samples (N,) -> normalised log-mel (T, n_mels) float32, T = max(1, ceil(N / 160)).

    Frame t is centred on sample 160 t (reflect padding as torch.stft; zero padding for clips of
    200 samples or fewer, too short to reflect). Silence gives ``SILENCE`` everywhere."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"log_mel: expected mono samples of shape (N,), got {x.shape}")
    frames = max(1, math.ceil(len(x) / HOP))
    half = N_FFT // 2  # (frames - 1) * HOP < len(x), so `half` samples each side complete every window
    padded = np.pad(x, half, mode="reflect" if len(x) > half else "constant")
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:frames]
    spectrum = np.fft.rfft(windows * _window(), axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2  # (T, n_fft/2 + 1)
    mel = power @ mel_filters(n_mels)  # (T, n_mels)
    return ((np.log10(np.maximum(mel, LOG_CLAMP)) + 4.0) / 4.0).astype(np.float32)


# -- storage ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaStore:
    """The decoded media of a dataset (see the module docstring); shared by all its views."""

    images: torch.Tensor  # (n_images, 3, S, S) uint8
    mels: torch.Tensor  # (total_frames, n_mels) float16
    mel_offsets: torch.Tensor  # (n_audio + 1,) long
    tokens: torch.Tensor  # (n_texts, L_max) int32, right-padded with pad_id
    token_lengths: torch.Tensor  # (n_texts,) long, <bos>/<eos> included
    pad_id: int = PAD_ID

    @property
    def mel_lengths(self) -> torch.Tensor:
        return self.mel_offsets[1:] - self.mel_offsets[:-1]


class NLMMData:
    """In-memory raw-media dataset. Each sample has any subset of image / audio / text."""

    def __init__(self, samples: list[Sample], store: MediaStore, image_rows: torch.Tensor, audio_rows: torch.Tensor,
                 text_rows: torch.Tensor, spec: MediaSpec, tokenizer: WordTokenizer | None = None, features: Any = None):
        n = len(samples)
        if not (len(image_rows) == len(audio_rows) == len(text_rows) == n):
            raise ValueError(f"NLMMData: {n} samples but {len(image_rows)}/{len(audio_rows)}/{len(text_rows)} rows")
        if features is not None and len(features) != n:
            raise ValueError(f"NLMMData: {n} samples but backbone features for {len(features)}")
        self.features: BackboneFeatures | None = features  # the frozen backbones' token features, row i = sample i
        self.samples = samples
        self.store = store
        self.image_rows, self.audio_rows, self.text_rows = image_rows.long(), audio_rows.long(), text_rows.long()
        self.spec = spec
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        s = self.store
        return (f"NLMMData({len(self)} samples; {len(s.images)} images, {len(s.mel_offsets) - 1} clips "
                f"({len(s.mels)} frames), {len(s.tokens)} texts)")

    @property
    def audio_pad_value(self) -> float:
        return SILENCE

    @property
    def text_pad_id(self) -> int:
        return self.store.pad_id

    def group_ids(self) -> torch.Tensor:
        """(N,) long: an id per distinct Sample.group, numbered in order of first appearance."""
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(s.group, len(ids)) for s in self.samples], dtype=torch.long)

    def select(self, idx: Sequence[int] | torch.Tensor) -> "NLMMData":
        """A view on the samples ``idx`` (in that order); the media tensors are shared, not copied."""
        index = _as_index(idx, len(self))
        features = None if self.features is None else BackboneFeatures(self.features.paired.select(index.tolist()), self.features.encoders)
        return NLMMData([self.samples[int(i)] for i in index], self.store, self.image_rows[index], self.audio_rows[index],
                        self.text_rows[index], self.spec, self.tokenizer, features)

    @property
    def backbone_modalities(self) -> tuple[str, ...]:
        return () if self.features is None else tuple(self.features.dims)

    def modalities(self) -> set[str]:
        """Modalities present in at least one sample."""
        rows = {"image": self.image_rows, "audio": self.audio_rows, "text": self.text_rows}
        return {m for m, r in rows.items() if bool((r >= 0).any())}

    def audio_frames(self) -> torch.Tensor:
        """(N,) long log-mel frames per sample, 0 without audio."""
        return self._lengths(self.audio_rows, self.store.mel_lengths)

    def text_lengths(self) -> torch.Tensor:
        """(N,) long tokens per sample including <bos>/<eos>, 0 without text."""
        return self._lengths(self.text_rows, self.store.token_lengths)

    @staticmethod
    def _lengths(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        has = rows >= 0
        out = torch.zeros(len(rows), dtype=torch.long)
        out[has] = lengths[rows[has]]
        return out

    def batch(self, idx: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The samples ``idx`` as padded tensors (every key always present; see the module docstring)."""
        index = _as_index(idx, len(self))
        out = {**self._images(self.image_rows[index]), **self._audio(self.audio_rows[index]),
               **self._text(self.text_rows[index])}
        for m in self.backbone_modalities:
            out.update(self._features(m, index))
        out["index"] = index
        return out

    def _features(self, modality: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``<m>_feat`` (B, T, D) float32 backbone tokens (zeros past each length and in rows
        without the modality) and ``<m>_feat_lengths`` (B,)."""
        paired = self.features.paired
        rows = paired.rows[modality][index] if modality in paired.rows else torch.full((len(index),), -1, dtype=torch.long)
        has = rows >= 0
        lengths = torch.zeros(len(rows), dtype=torch.long)
        if not has.any():
            return {f"{modality}_feat": torch.zeros(len(rows), 1, self.features.dims[modality]), f"{modality}_feat_lengths": lengths}
        got = paired.tables[modality].batch(rows[has])
        feats = torch.zeros(len(rows), got.tokens.shape[1], got.tokens.shape[2])
        feats[has] = got.tokens.float()
        lengths[has] = got.mask.sum(1)
        return {f"{modality}_feat": feats, f"{modality}_feat_lengths": lengths}

    def _images(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.spec.image_size
        has = rows >= 0
        image = torch.zeros((len(rows), 3, s, s), dtype=torch.float32)
        if has.any():
            image[has] = self.store.images[rows[has]].float().div_(127.5).sub_(1.0)  # (x/255 - 0.5) / 0.5
        return {"image": image, "image_mask": has}

    def _audio(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        has = rows >= 0
        lengths = self._lengths(rows, self.store.mel_lengths)
        t = max(1, int(lengths.max())) if len(rows) else 1
        audio = torch.full((len(rows), t, self.spec.n_mels), SILENCE, dtype=torch.float32)
        if has.any():
            steps = torch.arange(t)
            valid = steps < lengths[has, None]  # (b, t)
            pos = self.store.mel_offsets[rows[has], None] + steps
            gathered = self.store.mels[torch.where(valid, pos, 0)].float()  # (b, t, n_mels)
            audio[has] = torch.where(valid[..., None], gathered, torch.tensor(SILENCE))
        return {"audio": audio, "audio_lengths": lengths, "audio_mask": has}

    def _text(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        has = rows >= 0
        lengths = self._lengths(rows, self.store.token_lengths)
        width = max(2, int(lengths.max())) if len(rows) else 2
        text = torch.full((len(rows), width), self.store.pad_id, dtype=torch.long)
        if has.any():
            text[has] = self.store.tokens[rows[has], :width].long()
        return {"text": text, "text_lengths": lengths, "text_mask": has}


def _as_index(idx: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
        raise TypeError("expected sample indices, got a boolean mask (use mask.nonzero().flatten())")
    index = idx.to(torch.long).reshape(-1) if isinstance(idx, torch.Tensor) else torch.as_tensor(list(idx), dtype=torch.long)
    if len(index) and (int(index.min()) < -n or int(index.max()) >= n):
        raise IndexError(f"index out of range for a dataset of {n} samples")
    return index % n if n else index


# -- building -----------------------------------------------------------------------------------
def _media_key(item: Any) -> Any:
    """A dict key for one image/audio input: its path, its bytes, or (unhashable objects) its identity."""
    if isinstance(item, os.PathLike):
        return os.fspath(item)
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    try:
        hash(item)
    except TypeError:
        return ("object", id(item))
    return item


def _decode_image(item: Any, size: int) -> np.ndarray:
    img = open_image(item)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, S, S)


def _decode_audio(item: Any, spec: MediaSpec) -> np.ndarray:
    return log_mel(load_audio(item, sr=TARGET_SR, max_seconds=spec.max_audio_seconds), spec.n_mels).astype(np.float16)


def _attempt(fn: Callable[[Any], R], item: Any) -> R | InputError:
    try:
        return fn(item)
    except InputError as err:
        return err


def _map(fn: Callable[[T], R], items: list[T], workers: int, bar: Any) -> list[R]:
    """``[fn(x) for x in items]``, on ``workers`` threads when > 1 (results in input order)."""
    def step(x: T) -> R:
        r = fn(x)
        bar.update(1)
        return r

    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(step, items))
    return [step(x) for x in items]


def _first_items(keys: list[Any], items: list[Any]) -> list[Any]:
    """One input per distinct key (its first occurrence), in order of first appearance."""
    first: dict[Any, Any] = {}
    for k, item in zip(keys, items):
        if k is not None:
            first.setdefault(k, item)
    return list(first.values())


def _distinct(keys: Iterable[Any]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for k in keys:
        if k is not None:
            out.setdefault(k, len(out))
    return out


def build_nlmm_data(samples: list[Sample], tokenizer: WordTokenizer | None, spec: MediaSpec, report: DataReport,
                    progress: bool = False, workers: int = 1, backbones: Backbones | None = None) -> NLMMData:
    """Decode the samples' media into an ``NLMMData`` (each distinct input once); samples whose
    inputs fail are skipped and recorded in ``report``. ``tokenizer`` None ignores text.
    ``backbones``: frozen encoders whose token features the data also carries (``attach_features``).
    Raises DataError when samples were given and none is usable."""
    data = _build_raw(samples, tokenizer, spec, report, progress, workers)
    return attach_features(data, backbones, report, progress) if backbones is not None and backbones.encoders else data


@dataclass(frozen=True)
class BackboneFeatures:
    """Token features of an NLMMData's samples: ``paired`` (a features.pipeline.PairedData, row i =
    sample i) and the frozen encoders that made them."""

    paired: Any
    encoders: dict[str, Any]

    @cached_property
    def dims(self) -> dict[str, int]:
        """Each backbone's token width."""
        return {m: e.token_dim for m, e in self.encoders.items()}

    def __len__(self) -> int:
        return len(self.paired)

    def encode(self, modality: str, items: list[Any]) -> dict[str, torch.Tensor]:
        """``<m>_feat`` / ``<m>_feat_lengths`` of inputs outside the dataset (e.g. class names), encoded live."""
        out = self.encoders[modality].encode(items)
        feats = torch.where(out.mask[..., None], out.tokens.float().cpu(), 0.0)
        return {f"{modality}_feat": feats, f"{modality}_feat_lengths": out.mask.sum(1).long().cpu()}


@dataclass
class Backbones:
    """Frozen encoders per modality and where their features are cached (None: encoded live)."""

    encoders: dict[str, Any]
    cache_dir: Any = None
    dtype: str = "float16"
    shard_size: int = 1024


def attach_features(data: NLMMData, backbones: Backbones, report: DataReport, progress: bool = False) -> NLMMData:
    """``data`` with the backbones' token features of its samples (each distinct input encoded
    once, through the feature cache as alignment does); a sample whose input the backbone cannot
    read is skipped and recorded in ``report``, like a failed decode."""
    from ..features.pipeline import build_paired_data

    if not len(data):
        return data
    paired = build_paired_data(data.samples, backbones.encoders, report, backbones.cache_dir, backbones.dtype,
                               backbones.shard_size, progress)
    position = {id(s): i for i, s in enumerate(data.samples)}
    out = data.select([position[id(s)] for s in paired.samples])
    out.features = BackboneFeatures(paired, backbones.encoders)
    return out


def _build_raw(samples: list[Sample], tokenizer: WordTokenizer | None, spec: MediaSpec, report: DataReport,
               progress: bool, workers: int) -> NLMMData:
    from tqdm.auto import tqdm

    image_keys = [_media_key(s.image) if s.image is not None else None for s in samples]
    audio_keys = [_media_key(s.audio) if s.audio is not None else None for s in samples]
    images = _distinct(image_keys)
    clips = _distinct(audio_keys)
    image_items = _first_items(image_keys, [s.image for s in samples])
    audio_items = _first_items(audio_keys, [s.audio for s in samples])
    with tqdm(total=len(images) + len(clips), desc="decoding media", unit="item", disable=not progress, leave=False) as bar:
        decoded_images = _map(partial(_attempt, partial(_decode_image, size=spec.image_size)), image_items, workers, bar)
        decoded_clips = _map(partial(_attempt, partial(_decode_audio, spec=spec)), audio_items, workers, bar)

    kept: list[int] = []
    texts: list[list[int] | None] = []
    for i, s in enumerate(samples):
        err = _failure(image_keys[i], images, decoded_images) or _failure(audio_keys[i], clips, decoded_clips)
        if err is not None:
            report.skip(s.source, err.reason, err.what)
            continue
        ids: list[int] | None = None
        if tokenizer is not None and s.text is not None:
            ids = tokenizer.encode(s.text)[: spec.max_text_tokens]
            if not ids:
                report.skip(s.source, "empty caption", _describe(s) or repr(s.text))
                continue
        if image_keys[i] is None and audio_keys[i] is None and ids is None:
            reason = "no image, audio or text" if s.text is None else "no usable modality (text only, and text is ignored without a tokenizer)"
            report.skip(s.source, reason, repr(s.text) if s.text is not None else "")
            continue
        kept.append(i)
        texts.append(ids)

    if samples and not kept:
        last = report.skipped[-1]
        raise DataError(f"no usable samples: all {len(samples)} were skipped (last: {last.source}: {last.reason})")

    # tables of the inputs the kept samples use, in order of first use
    used_images = _distinct(image_keys[i] for i in kept)
    used_clips = _distinct(audio_keys[i] for i in kept)
    text_keys = [tuple(t) if t is not None else None for t in texts]
    used_texts = _distinct(text_keys)
    s = spec.image_size
    image_table = (torch.from_numpy(np.stack([decoded_images[images[k]] for k in used_images])) if used_images
                   else torch.zeros((0, 3, s, s), dtype=torch.uint8))
    mel_list = [decoded_clips[clips[k]] for k in used_clips]
    mels = (torch.from_numpy(np.concatenate(mel_list)) if mel_list else torch.zeros((0, spec.n_mels), dtype=torch.float16))
    offsets = torch.zeros(len(mel_list) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([len(m) for m in mel_list], dtype=torch.long).cumsum(0)
    pad_id = tokenizer.pad_id if tokenizer is not None else PAD_ID
    width = max([len(t) + 2 for t in used_texts], default=2)
    tokens = torch.full((len(used_texts), width), pad_id, dtype=torch.int32)
    lengths = torch.zeros(len(used_texts), dtype=torch.long)
    for r, t in enumerate(used_texts):  # texts exist only with a tokenizer
        row = [tokenizer.bos_id, *t, tokenizer.eos_id]  # type: ignore[union-attr]
        tokens[r, : len(row)] = torch.tensor(row, dtype=torch.int32)
        lengths[r] = len(row)
    store = MediaStore(image_table, mels, offsets, tokens, lengths, pad_id)

    def rows(keys: list[Any], table: dict[Any, int]) -> torch.Tensor:
        return torch.tensor([table[k] if k is not None else -1 for k in keys], dtype=torch.long)

    return NLMMData([samples[i] for i in kept], store, rows([image_keys[i] for i in kept], used_images),
                    rows([audio_keys[i] for i in kept], used_clips), rows(text_keys, used_texts), spec, tokenizer)


def _failure(key: Any, table: dict[Any, int], decoded: list[Any]) -> InputError | None:
    if key is None:
        return None
    result = decoded[table[key]]
    return result if isinstance(result, InputError) else None


def _describe(s: Sample) -> str:
    if s.image is not None:
        return describe_image(s.image)
    return describe_audio(s.audio) if s.audio is not None else ""


def text_vocabulary(samples: Iterable[Sample], min_count: int = 1, max_size: int | None = None) -> WordTokenizer:
    """A WordTokenizer over the samples' texts (most frequent words first; deterministic)."""
    return WordTokenizer.build((s.text for s in samples if s.text), min_count=min_count, max_size=max_size)
