"""Frozen-feature cache: backbone outputs computed once, stored on disk, reused across epochs and runs.

Layout: <cache dir>/<encoder.cache_id()>/shard-*.safetensors. The directory name hashes the
encoder fingerprint (weights digest, preprocessing, precision, code version), so changing any
of them starts a fresh directory; inside, items are keyed by a digest of their content (image
bytes, text), so renamed files hit and edited files miss. Inputs are encoded in batches of
similar length (a window of prepared inputs sorted by ``Encoder.length``), which saves padding
and changes an item's features by float rounding at most. A shard holds ragged token sequences
(tokens concatenated, with per-item lengths) and pooled vectors; it is written to a temporary
name and renamed, so a killed run never leaves a half-written shard.

Reading: ``FeatureCache.load(keys)`` returns a ShardedFeatureTable, which keeps per item only
(shard, first token, length, row), found from the shard headers and their small ``lengths``
tensors, and leaves the features on disk: ``batch(rows)`` reads just those token ranges and pooled
rows (os.preadv into the batch buffer, or with ``reader="mmap"`` an index_select over the mapped
shard whose pages are then dropped from the process). Training from the cache therefore needs
memory proportional to a batch, not to the data (benchmarks/cache_rss.py). ``load(keys,
in_memory=True)`` (or ``table.to_memory()``) gives the in-RAM FeatureTable. A damaged shard
(truncated, not safetensors) is skipped with a warning naming it, and its items are encoded again.
"""
from __future__ import annotations

import json
import mmap
import os
import uuid
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..encoders.base import EncoderOutput, FrozenEncoder
from ..atomic import atomic_write_json, atomic_write_safetensors
from ..errors import EdgeGlassError, InputError
from ..paths import cache_root

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _padded_index(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max T) row index of each item's token t (its last token repeated past its length: any
    real row, zeroed later) and the (B, max T) mask of real tokens."""
    steps = torch.arange(int(lengths.max()))
    mask = steps[None, :] < lengths[:, None]
    return starts[:, None] + torch.minimum(steps[None, :], (lengths - 1).clamp_min(0)[:, None]), mask


def _as_output(tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, copy: bool = False) -> EncoderOutput:
    """Stored-dtype (B, T, D) tokens -> float32 with exact (+0.0) zeros past each length (``copy``:
    always new tensors, also when already float32)."""
    tokens = tokens.to(torch.float32, copy=copy)
    if not bool(mask.all()):
        tokens[~mask] = 0.0
    return EncoderOutput(tokens, mask, pooled.to(torch.float32, copy=copy))


class FeatureTable:
    """Features of N items held in memory: ragged tokens + pooled; ``batch(rows)`` pads.

    tokens (sum T_i, D), lengths (N,), pooled (N, D) -> batch(rows) = EncoderOutput with tokens
    (B, max T_i, D) float32 (exact zeros past each item's length) and mask (B, max T_i).
    """

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, pooled: torch.Tensor):
        self.tokens, self.lengths, self.pooled = tokens, lengths.long(), pooled
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        torch.cumsum(self.lengths, 0, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: torch.Tensor) -> EncoderOutput:
        rows = torch.as_tensor(rows, dtype=torch.long)
        index, mask = _padded_index(self.offsets[rows], self.lengths[rows])
        index = index.clamp_max(max(len(self.tokens) - 1, 0))  # a zero-length last item
        tokens = self.tokens.index_select(0, index.flatten()).view(*index.shape, self.tokens.shape[1])
        return _as_output(tokens, mask, self.pooled.index_select(0, rows))

    @staticmethod
    def from_outputs(outs: list[EncoderOutput], dtype: torch.dtype) -> "FeatureTable":
        toks, lens, pooled = [], [], []
        for o in outs:
            rows = o.tokens.flatten(0, 1) if bool(o.mask.all()) else o.tokens[o.mask]  # (no padding: no gather)
            toks.append(rows.to("cpu", dtype))
            lens.append(o.mask.sum(1).cpu())
            pooled.append(o.pooled.to("cpu", dtype))
        return FeatureTable(torch.cat(toks), torch.cat(lens), torch.cat(pooled))


# --- shards on disk -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardHeader:
    """A shard file's safetensors header: per tensor (dtype, shape, first byte, end byte) in the
    file, and the file size it implies. Parsed without reading the data."""

    path: Path
    size: int
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]

    def rows(self) -> int:
        return self.tensors["lengths"][1][0]


def shard_error(path: Path, why: str) -> EdgeGlassError:
    return EdgeGlassError(f"{path}: unreadable feature shard ({why})")


def read_shard_header(path: Path) -> tuple[ShardHeader, dict[str, str]]:
    """(header, metadata) of a shard; an EdgeGlassError naming the file if it is truncated, not
    safetensors, or lacks the cache's tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise shard_error(path, f"{size} bytes: too short for its safetensors header" if size < 8 or n > size - 8
                                  else "not a safetensors file")
            raw = json.loads(f.read(n))
    except OSError as exc:
        raise shard_error(path, exc.strerror or str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise shard_error(path, "its safetensors header is not valid JSON") from None
    if not isinstance(raw, dict):
        raise shard_error(path, "its safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, info in raw.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(x) for x in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise shard_error(path, f"tensor {name!r} has a malformed header entry") from None
        numel = 1
        for x in shape:
            numel *= x
        if b - a != numel * dtype.itemsize or a < 0:
            raise shard_error(path, f"tensor {name!r}: {b - a} bytes for shape {list(shape)} {info['dtype']}")
        tensors[name] = (dtype, shape, 8 + n + a, 8 + n + b)
        end = max(end, b)
    if 8 + n + end != size:
        raise shard_error(path, f"truncated: its header describes {8 + n + end} bytes, the file has {size}"
                          if size < 8 + n + end else f"{size - 8 - n - end} trailing bytes after the data")
    missing = {"tokens", "lengths", "pooled"} - set(tensors)
    if missing:
        raise shard_error(path, f"no {', '.join(sorted(missing))} tensor")
    (_, tok, _, _), (_, lens, _, _), (_, pool, _, _) = (tensors[k] for k in ("tokens", "lengths", "pooled"))
    if len(tok) != 2 or len(lens) != 1 or len(pool) != 2 or pool[0] != lens[0]:
        raise shard_error(path, f"inconsistent shapes: tokens {list(tok)}, lengths {list(lens)}, pooled {list(pool)}")
    return ShardHeader(path, size, tensors), meta


def read_shard_tensor(header: ShardHeader, name: str) -> torch.Tensor:
    """One (small) tensor of a shard, read with plain file I/O (no mapping)."""
    dtype, shape, a, b = header.tensors[name]
    buf = bytearray(b - a)
    try:
        with open(header.path, "rb") as f:
            f.seek(a)
            got = f.readinto(buf)
    except OSError as exc:
        raise shard_error(header.path, exc.strerror or str(exc)) from None
    if got != len(buf):
        raise shard_error(header.path, f"truncated: {got} of the {len(buf)} bytes of {name!r}")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


class _OpenShard:
    """A shard file open for reading: its descriptor, and for the "mmap" reader its data mapped
    read-only (copy-on-write, never written) with tensor views over the map."""

    def __init__(self, header: ShardHeader, mapped: bool):
        self.header = header
        try:
            self.fd = os.open(header.path, os.O_RDONLY)
        except OSError as exc:
            raise shard_error(header.path, exc.strerror or str(exc)) from None
        self.map, self.views = None, {}
        try:
            self.check()
            if mapped:
                self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # private + writable: torch.frombuffer wants a writable buffer
                self.views = {name: self._view(name) for name in ("tokens", "pooled")}
        except BaseException:
            self.close()
            raise

    def _view(self, name: str) -> torch.Tensor:
        dtype, shape, a, b = self.header.tensors[name]
        if a == b:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.map, dtype=dtype, count=(b - a) // dtype.itemsize, offset=a).view(shape)

    def check(self) -> None:
        """Refuse a file whose size changed since the cache was read (reading a map past the end of
        its file is SIGBUS, not an exception)."""
        size = os.fstat(self.fd).st_size
        if size != self.header.size:
            raise shard_error(self.header.path, f"it changed on disk: {size} bytes, {self.header.size} when the cache was read")

    def read_into(self, buf, offset: int) -> None:
        """Fill ``buf`` (a writable buffer) with the file's bytes at ``offset``."""
        try:
            got = os.preadv(self.fd, [buf], offset)
        except OSError as exc:
            raise shard_error(self.header.path, exc.strerror or str(exc)) from None
        if got != len(buf):
            raise shard_error(self.header.path, f"truncated: {got} of {len(buf)} bytes at offset {offset}")

    def release(self) -> None:
        """Drop the mapped pages read so far from this process (they stay in the OS page cache)."""
        if self.map is not None:
            self.map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.views = {}
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view escaped (it should not): leave the map to the garbage collector
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


READERS = ("pread", "mmap")


class ShardedFeatureTable:
    """Features of N items left in their cache shards on disk; ``batch(rows)`` reads only those rows.

    Per item it holds four integers (shard, first token row in the shard, length, row in the
    shard); shard files are opened on first use, at most ``max_open`` at a time (least recently
    used closed first). Readers:

      pread  each item's token range and pooled row read with os.preadv straight into the batch
             buffer: nothing is mapped, so nothing of the data stays in the process
      mmap   the shard's data memory-mapped, a batch gathered with index_select over
             torch.frombuffer views, then its pages dropped from the process (madvise DONTNEED)

    Both give exactly what FeatureTable.batch gives on the same data (bitwise). Counters:
    ``opens`` (shard files opened), ``bytes_read`` (token + pooled bytes read for batches).
    Not thread-safe (one table per worker).
    """

    def __init__(self, headers: list[ShardHeader], shard: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor,
                 row: torch.Tensor, reader: str = "pread", max_open: int = 128):
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
        self.headers, self.reader = headers, reader
        self.shard, self.start, self.lengths, self.row = shard.int(), start.long(), lengths.long(), row.long()
        kinds = {(h.tensors["tokens"][0], h.tensors["tokens"][1][1], h.tensors["pooled"][0], h.tensors["pooled"][1][1]) for h in headers}
        if len(kinds) != 1:
            raise EdgeGlassError(f"feature shards disagree on dtype or width: {sorted(map(str, kinds))} ({headers[0].path.parent})")
        self.dtype, self.dim, self.pooled_dtype, self.pooled_dim = kinds.pop()
        self.max_open = max(1, max_open)
        self.opens, self.bytes_read = 0, 0
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict[str, Any]:  # open files do not pickle (e.g. to spawned workers): reopened there
        return {**self.__dict__, "_open": OrderedDict(), "_buffers": {}}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def close(self) -> None:
        """Close every open shard file (they reopen on the next batch)."""
        for f in getattr(self, "_open", {}).values():
            f.close()
        if hasattr(self, "_open"):
            self._open.clear()

    def _file(self, s: int) -> _OpenShard:
        f = self._open.get(s)
        if f is None:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            f = self._open[s] = _OpenShard(self.headers[s], mapped=self.reader == "mmap")
            self.opens += 1
        else:
            self._open.move_to_end(s)
        return f

    def _scratch(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer (so a batch does not page-fault fresh memory in for every copy)."""
        n = 1
        for x in shape:
            n *= x
        buf = self._buffers.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(slot, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def batch(self, rows: torch.Tensor) -> EncoderOutput:
        rows = torch.as_tensor(rows, dtype=torch.long)
        lengths = self.lengths[rows]
        mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        tokens = self._scratch(0, (*mask.shape, self.dim), self.dtype)  # past each length: stale bytes, zeroed below
        pooled = self._scratch(1, (len(rows), self.pooled_dim), self.pooled_dtype)
        (self._pread if self.reader == "pread" else self._gather_mapped)(rows, lengths, tokens, pooled)
        self.bytes_read += int(lengths.sum()) * self.dim * self.dtype.itemsize + len(rows) * self.pooled_dim * self.pooled_dtype.itemsize
        return _as_output(tokens, mask, pooled, copy=True)  # new float32 tensors: nothing returned aliases the buffers

    def _pread(self, rows: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        step, pstep = self.dim * self.dtype.itemsize, self.pooled_dim * self.pooled_dtype.itemsize
        tok_bytes = tokens.view(len(rows), -1).view(torch.uint8).numpy()
        pool_bytes = pooled.view(torch.uint8).numpy()
        for i, (s, first, n, r) in enumerate(zip(self.shard[rows].tolist(), self.start[rows].tolist(), lengths.tolist(), self.row[rows].tolist())):
            f = self._file(s)
            f.read_into(tok_bytes[i, : n * step], f.header.tensors["tokens"][2] + first * step)
            f.read_into(pool_bytes[i], f.header.tensors["pooled"][2] + r * pstep)

    def _gather_mapped(self, rows: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        """Shard by shard: index_select over the map (each item's last token repeated past its length)."""
        index, _ = _padded_index(self.start[rows], lengths)
        shards = self.shard[rows]
        order = torch.argsort(shards, stable=True)
        ids, counts = torch.unique_consecutive(shards[order], return_counts=True)
        one = len(ids) == 1  # the whole batch in one shard: gather straight into place
        for s, pick in zip(ids.tolist(), torch.split(order, counts.tolist())):
            f = self._file(s)
            f.check()
            t_out = tokens if one else self._scratch(2, (len(pick), *tokens.shape[1:]), self.dtype)
            p_out = pooled if one else self._scratch(3, (len(pick), self.pooled_dim), self.pooled_dtype)
            try:
                torch.index_select(f.views["tokens"], 0, index[pick].flatten().clamp_max(max(len(f.views["tokens"]) - 1, 0)),
                                   out=t_out.view(-1, self.dim))
                torch.index_select(f.views["pooled"], 0, self.row[rows[pick]], out=p_out)
            finally:
                f.release()
            if not one:
                tokens.index_copy_(0, pick, t_out)
                pooled.index_copy_(0, pick, p_out)

    def to_memory(self) -> FeatureTable:
        """The same features as an in-RAM FeatureTable (stored dtype; O(N x T x D) memory)."""
        tokens = torch.empty(int(self.lengths.sum()), self.dim, dtype=self.dtype)
        pooled = torch.empty(len(self), self.pooled_dim, dtype=self.pooled_dtype)
        step, pstep = self.dim * self.dtype.itemsize, self.pooled_dim * self.pooled_dtype.itemsize
        tok_bytes, pool_bytes = tokens.view(-1).view(torch.uint8).numpy(), pooled.view(torch.uint8).numpy()
        at = 0
        for i, (s, first, n, r) in enumerate(zip(self.shard.tolist(), self.start.tolist(), self.lengths.tolist(), self.row.tolist())):
            f = self._file(s)
            f.read_into(tok_bytes[at * step : (at + n) * step], f.header.tensors["tokens"][2] + first * step)
            f.read_into(pool_bytes[i], f.header.tensors["pooled"][2] + r * pstep)
            at += n
        self.close()
        return FeatureTable(tokens, self.lengths.clone(), pooled)


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
        self.headers: dict[Path, ShardHeader] = {}
        self._scan()

    def _scan(self) -> None:
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                header, meta = read_shard_header(shard)
                if meta.get("dtype") != self.dtype_name:
                    continue
                keys = json.loads(meta["keys"])
                if len(keys) != header.rows():
                    raise shard_error(shard, f"{len(keys)} keys for {header.rows()} rows")
            except (EdgeGlassError, KeyError, TypeError, json.JSONDecodeError) as exc:
                # writes are atomic, so this is damage from outside: skip the file, its items are encoded again
                why = exc if isinstance(exc, EdgeGlassError) else shard_error(shard, f"bad metadata: {exc!r}")
                warnings.warn(f"{why}; skipped: its items are encoded again", stacklevel=3)
                continue
            self.headers[shard] = header
            for row, key in enumerate(keys):
                self.index.setdefault(key, (shard, row))

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
        self.headers[shard] = read_shard_header(shard)[0]
        for row, key in enumerate(keys):
            self.index.setdefault(key, (shard, row))

    def _prepare_window(self, keys: list[str], items: dict[str, Any]) -> tuple[list[str], list[Any], dict[str, InputError]]:
        chunk, prepared, failures = [], [], {}
        for key in keys:
            try:
                prepared.append(self.encoder.prepare(items[key]))
                chunk.append(key)
            except InputError as err:
                failures[key] = err
        return chunk, prepared, failures

    def fill(self, items: dict[str, Any], batch_size: int, desc: str = "encoding", progress: bool = True) -> dict[str, InputError]:
        """Encode every item whose key is not cached yet. Returns {key: error} for unusable inputs.

        One worker thread decodes the next window of inputs and writes finished shards while the
        encoder runs (decoding, file writes and ONNX Runtime release the GIL); shards hold the same
        rows in the same order as without it."""
        todo = self.missing(items)
        failures: dict[str, InputError] = {}
        if not todo:
            return failures
        pending_keys: list[str] = []
        pending_outs: list[EncoderOutput] = []
        bar = tqdm(total=len(todo), desc=f"{desc} ({self.encoder.modality})", unit="item", disable=not progress, leave=False)
        sized = type(self.encoder).length is not FrozenEncoder.length  # fixed-size inputs (images): no window
        window = batch_size * (self.SORT_WINDOW if sized else 1)
        windows = [todo[start : start + window] for start in range(0, len(todo), window)]
        with ThreadPoolExecutor(1, thread_name_prefix="edge-glass-cache") as worker:
            writes = []
            ahead = worker.submit(self._prepare_window, windows[0], items)
            for w, keys in enumerate(windows):
                chunk, prepared, errors = ahead.result()
                failures.update(errors)
                if w + 1 < len(windows):
                    ahead = worker.submit(self._prepare_window, windows[w + 1], items)
                order = sorted(range(len(chunk)), key=lambda i: self.encoder.length(prepared[i]))  # stable: ties keep input order
                for b in range(0, len(order), batch_size):
                    idx = order[b : b + batch_size]
                    pending_outs.append(self.encoder(self.encoder.collate([prepared[i] for i in idx])))
                    pending_keys.extend(chunk[i] for i in idx)
                    bar.update(len(idx))
                    if len(pending_keys) >= self.shard_size:
                        writes.append(worker.submit(self._write_shard, pending_keys, pending_outs))
                        pending_keys, pending_outs = [], []
                bar.update(len(keys) - len(chunk))
            if pending_keys:
                writes.append(worker.submit(self._write_shard, pending_keys, pending_outs))
            for done in writes:
                done.result()  # a failed write raises here
        bar.close()
        return failures

    def load(self, keys: list[str], in_memory: bool = False, reader: str = "pread",
             max_open: int = 128) -> "ShardedFeatureTable | FeatureTable":
        """The features of ``keys`` (all cached), in that order: a ShardedFeatureTable that reads a
        batch's rows from the shards on demand (O(N) small integers in memory; ``reader`` "pread"
        or "mmap"), or with ``in_memory`` an in-RAM FeatureTable of all of them."""
        if not keys:
            raise ValueError("FeatureCache.load: no keys given")
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for pos, key in enumerate(keys):
            path, r = self.index[key]
            where = by_shard.setdefault(path, ([], []))
            where[0].append(pos)
            where[1].append(r)
        n = len(keys)
        shard, row = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.long)
        start, lengths = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        headers = []
        for s, (path, (positions, rows)) in enumerate(by_shard.items()):
            h = self.headers[path]
            headers.append(h)
            lens = read_shard_tensor(h, "lengths").long()
            if int(lens.sum()) != h.tensors["tokens"][1][0] or bool((lens < 0).any()):
                raise shard_error(path, f"its lengths sum to {int(lens.sum())}, it holds {h.tensors['tokens'][1][0]} tokens")
            pos, r = torch.tensor(positions), torch.tensor(rows)
            shard[pos], row[pos] = s, r
            start[pos] = (torch.cumsum(lens, 0) - lens)[r]
            lengths[pos] = lens[r]
        table = ShardedFeatureTable(headers, shard, start, lengths, row, reader, max_open)
        return table.to_memory() if in_memory else table


def feature_cache_dir(cfg) -> Path | None:
    """Where a config's features are cached (``cache.dir``, default $EDGE_GLASS_CACHE/features); None when off."""
    if not cfg.cache.enabled:
        return None
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir else cache_root() / "features"
