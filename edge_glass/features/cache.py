"""Frozen-feature cache: backbone outputs computed once, stored on disk, reused across epochs and runs.

Layout: <cache dir>/<encoder.cache_id()>/shard-*.safetensors. The directory name hashes the
encoder fingerprint (weights digest, preprocessing, precision, code version), so changing any
of them starts a fresh directory; inside, items are keyed by a digest of their content (image
bytes, text), so renamed files hit and edited files miss. Inputs are encoded in batches of
similar length (a window of prepared inputs sorted by ``Encoder.length``), which saves padding
and changes an item's features by float rounding at most. A shard holds ragged token sequences
(tokens concatenated, with per-item lengths) and pooled vectors; it is written to a temporary
name and renamed, so a killed run never leaves a half-written shard.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..encoders.base import EncoderOutput, FrozenEncoder
from ..atomic import atomic_write_json, atomic_write_safetensors
from ..errors import InputError
from ..paths import cache_root

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FeatureTable:
    """Features of N items held in memory: ragged tokens + pooled; ``batch(rows)`` pads.

    tokens (sum T_i, D), lengths (N,), pooled (N, D) -> batch(rows) = EncoderOutput with tokens
    (B, max T_i, D) float32 and mask (B, max T_i).
    """

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, pooled: torch.Tensor):
        self.tokens, self.lengths, self.pooled = tokens, lengths.long(), pooled
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        torch.cumsum(self.lengths, 0, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: torch.Tensor) -> EncoderOutput:
        lengths = self.lengths[rows]
        t = int(lengths.max())
        steps = torch.arange(t)
        mask = steps[None, :] < lengths[:, None]
        index = (self.offsets[rows][:, None] + steps[None, :]).clamp_max(len(self.tokens) - 1)
        tokens = self.tokens[index].float() * mask[..., None]
        return EncoderOutput(tokens, mask, self.pooled[rows].float())

    @staticmethod
    def from_outputs(outs: list[EncoderOutput], dtype: torch.dtype) -> "FeatureTable":
        toks, lens, pooled = [], [], []
        for o in outs:
            toks.append(o.tokens[o.mask].to("cpu", dtype))
            lens.append(o.mask.sum(1).cpu())
            pooled.append(o.pooled.to("cpu", dtype))
        return FeatureTable(torch.cat(toks), torch.cat(lens), torch.cat(pooled))


class LiveFeatures:
    """Same interface as FeatureTable, but encodes the inputs on every call (no cache)."""

    def __init__(self, encoder: FrozenEncoder, items: list[Any]):
        self.encoder, self.items = encoder, items

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, rows: torch.Tensor) -> EncoderOutput:
        return self.encoder.encode([self.items[int(r)] for r in rows])


class FeatureCache:
    SORT_WINDOW = 16  # batches prepared at a time and regrouped by input length (Encoder.length)

    def __init__(self, root: Path, encoder: FrozenEncoder, dtype: str = "float16", shard_size: int = 1024):
        self.encoder = encoder
        self.dir = Path(root) / encoder.cache_id()
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        self.shard_size = shard_size
        self.index: dict[str, tuple[Path, int]] = {}
        self._scan()

    def _scan(self) -> None:
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    meta = f.metadata() or {}
                if meta.get("dtype") != self.dtype_name:
                    continue
                for row, key in enumerate(json.loads(meta["keys"])):
                    self.index.setdefault(key, (shard, row))
            except Exception:  # unreadable shard (should not happen: writes are atomic): ignore it
                continue

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self.index]

    def _write_shard(self, keys: list[str], outs: list[EncoderOutput]) -> None:
        table = FeatureTable.from_outputs(outs, self.dtype)
        self.dir.mkdir(parents=True, exist_ok=True)
        fp = self.dir / "fingerprint.json"
        if not fp.exists():
            atomic_write_json(fp, self.encoder.fingerprint())
        shard = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        meta = {"keys": json.dumps(keys), "dtype": self.dtype_name}
        atomic_write_safetensors(shard, {"tokens": table.tokens, "lengths": table.lengths, "pooled": table.pooled}, meta)
        for row, key in enumerate(keys):
            self.index.setdefault(key, (shard, row))

    def fill(self, items: dict[str, Any], batch_size: int, desc: str = "encoding", progress: bool = True) -> dict[str, InputError]:
        """Encode every item whose key is not cached yet. Returns {key: error} for unusable inputs."""
        todo = self.missing(items)
        failures: dict[str, InputError] = {}
        if not todo:
            return failures
        self.encoder.ensure_loaded()
        pending_keys: list[str] = []
        pending_outs: list[EncoderOutput] = []
        bar = tqdm(total=len(todo), desc=f"{desc} ({self.encoder.modality})", unit="item", disable=not progress, leave=False)
        sized = type(self.encoder).length is not FrozenEncoder.length  # fixed-size inputs (images): no window
        window = batch_size * (self.SORT_WINDOW if sized else 1)
        for start in range(0, len(todo), window):
            chunk, prepared = [], []
            for key in todo[start : start + window]:
                try:
                    prepared.append(self.encoder.prepare(items[key]))
                    chunk.append(key)
                except InputError as err:
                    failures[key] = err
            order = sorted(range(len(chunk)), key=lambda i: self.encoder.length(prepared[i]))  # stable: ties keep input order
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                pending_outs.append(self.encoder(self.encoder.collate([prepared[i] for i in idx])))
                pending_keys.extend(chunk[i] for i in idx)
                bar.update(len(idx))
                if len(pending_keys) >= self.shard_size:
                    self._write_shard(pending_keys, pending_outs)
                    pending_keys, pending_outs = [], []
            bar.update(len(todo[start : start + window]) - len(chunk))
        if pending_keys:
            self._write_shard(pending_keys, pending_outs)
        bar.close()
        return failures

    def load(self, keys: list[str]) -> FeatureTable:
        """The features of ``keys`` (all cached), in that order."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for pos, key in enumerate(keys):
            shard, row = self.index[key]
            by_shard.setdefault(shard, []).append((pos, row))
        lengths = torch.zeros(len(keys), dtype=torch.long)
        pieces: list[torch.Tensor | None] = [None] * len(keys)
        pooled: torch.Tensor | None = None
        for shard, wanted in by_shard.items():
            data = load_file(str(shard))
            offsets = torch.zeros(len(data["lengths"]) + 1, dtype=torch.long)
            torch.cumsum(data["lengths"].long(), 0, out=offsets[1:])
            if pooled is None:
                pooled = torch.empty(len(keys), data["pooled"].shape[1], dtype=data["pooled"].dtype)
            for pos, row in wanted:
                pieces[pos] = data["tokens"][offsets[row] : offsets[row + 1]]
                lengths[pos] = offsets[row + 1] - offsets[row]
                pooled[pos] = data["pooled"][row]
        if pooled is None:
            raise ValueError("FeatureCache.load: no keys given")
        return FeatureTable(torch.cat(pieces), lengths, pooled)  # type: ignore[arg-type]


def feature_cache_dir(cfg) -> Path | None:
    """Where a config's features are cached (``cache.dir``, default $EDGE_GLASS_CACHE/features); None when off."""
    if not cfg.cache.enabled:
        return None
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir else cache_root() / "features"
