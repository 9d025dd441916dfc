"""Whisper audio encoder: variable-length masks, independence of a clip's tokens from its batch,
equality with Whisper's own front end and with transformers' 30 s encoder, and InputErrors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from numerics import FP32_NET, FP32_OPS, FP32_SUM, assert_close_rel
from pydantic import ValidationError

from edge_glass.encoders.base import ENCODERS
from edge_glass.encoders.whisper import WhisperAudioEncoder
from edge_glass.errors import InputError, ModelNotFoundError
from edge_glass.paths import data_root

SR = 16000


def wav_bytes(x: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def make(**overrides) -> WhisperAudioEncoder:
    enc = WhisperAudioEncoder(WhisperAudioEncoder.Config(**overrides))
    try:
        enc.token_dim
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return enc


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """5.5 s of real speech (an Asterisk prompt, 8 kHz resampled to 16 kHz)."""
    from edge_glass.media.audio import load_audio

    path = data_root() / "asterisk" / "wav" / "agent-alreadyon.wav"
    if not path.is_file():
        pytest.skip(f"Asterisk prompt not found at {path} (set EDGE_GLASS_DATA to the shared data folder)")
    return load_audio(path)


@pytest.fixture(scope="module")
def encoder() -> WhisperAudioEncoder:
    return make().ensure_loaded()


@pytest.fixture(scope="module")
def fixed_encoder() -> WhisperAudioEncoder:
    return make(variable_length=False).ensure_loaded()


@pytest.fixture(scope="module")
def clips(speech):
    """A 1 s and a 3 s clip of speech, as encoded WAV bytes."""
    return wav_bytes(speech[:SR]), wav_bytes(speech[SR: 4 * SR])


def test_registered_and_config_is_validated():
    assert ENCODERS.get("whisper") is WhisperAudioEncoder
    with pytest.raises(ValidationError):
        WhisperAudioEncoder.Config(max_seconds=45)  # the positional table covers 30 s
    with pytest.raises(ValidationError):
        WhisperAudioEncoder.Config(variable_lenght=False)


def test_metadata_is_known_without_loading_weights():
    enc = make()
    assert enc.token_dim == 384
    assert enc.preprocessing()["variable_length"] is True and enc.preprocessing()["n_mels"] == 80
    assert enc.cache_id() != make(variable_length=False).cache_id()
    assert enc.cache_id() != make(max_seconds=10).cache_id()
    assert len(enc.weights_id()) == 64
    assert not enc._loaded


def test_variable_length_masks_cover_each_clip_and_padding_is_masked(encoder, clips):
    out = encoder.encode(list(clips))
    assert out.tokens.shape == (2, 150, 384)
    assert out.mask.sum(1).tolist() == [50, 150]
    assert out.mask[0, :50].all() and not out.mask[0, 50:].any()
    assert (out.tokens[0, 50:] == 0).all()
    # pooled is the mean over the clip's own positions: the same sum in another order, so the
    # rounding scales with the summed tokens (max |h| ~ 12), not with the (possibly ~0) mean
    assert_close_rel(out.pooled[0], out.tokens[0, :50].mean(0), FP32_SUM, "pooled 1 s", scale=out.tokens[0].abs().max())
    assert_close_rel(out.pooled[1], out.tokens[1].mean(0), FP32_SUM, "pooled 3 s", scale=out.tokens[1].abs().max())


def test_a_clip_alone_equals_the_same_clip_in_a_mixed_batch(encoder, clips):
    mixed = encoder.encode(list(clips))
    alone = encoder.encode([clips[0]])
    assert alone.tokens.shape == (1, 50, 384) and alone.mask.all()
    # other shapes (50 vs 150 positions, masked keys): the same maths, another float32 rounding
    # through 4 layers, so relative to max |h| (~12): FP32_NET
    gap = assert_close_rel(alone.tokens[0], mixed.tokens[0, :50], FP32_NET, "tokens alone vs in a batch")
    print(f"1 s clip alone vs in a batch with a 3 s clip: {gap}")
    assert_close_rel(alone.pooled[0], mixed.pooled[0], FP32_NET, "pooled alone vs in a batch", scale=alone.tokens[0].abs().max())


def test_features_equal_whisper_30s_front_end_on_the_clip_frames(encoder, speech):
    from transformers import WhisperFeatureExtractor

    prepared = encoder.prepare(wav_bytes(speech))
    assert prepared.frames == 552 and prepared.mel.shape == (80, 554)  # 5.516 s -> 552 frames (+2 look-ahead)
    fe = WhisperFeatureExtractor(feature_size=80)
    # our front end is numpy in float64 (edge_glass.media.audio, shared with edge_glass.runtime): compare with
    # transformers' numpy path (float64 too); its torch path (float32 STFT) sits 2e-5 away from both
    window = np.zeros(30 * SR, np.float32)
    window[: len(speech)] = speech
    reference = torch.from_numpy(fe._np_extract_fbank_features(window[None], "cpu")[0])
    assert_close_rel(prepared.mel, reference[:, :554], FP32_OPS, "log-mel")
    torch_path = fe(speech, sampling_rate=SR, return_tensors="pt").input_features[0]
    assert_close_rel(prepared.mel, torch_path[:, :554], 1e-4, "log-mel vs transformers' float32 torch path")
    assert prepared.pad_value == pytest.approx(reference[:, -1].max().item(), abs=1e-6)  # what silence becomes


def test_fixed_30s_mode_reproduces_transformers_encoder(fixed_encoder, speech):
    out = fixed_encoder.encode([wav_bytes(speech)])
    assert out.tokens.shape == (1, 1500, 384) and out.mask.sum().item() == 276  # positions covering 5.5 s
    mel = fixed_encoder.prepare(wav_bytes(speech)).mel[None]  # the front end is compared with transformers' above
    with torch.no_grad():
        reference = fixed_encoder.encoder(mel).last_hidden_state  # transformers' WhisperEncoder.forward
    # the whole 30 s window was computed as transformers does; positions past the audio are masked (and zeroed)
    # the same ops on the same shapes as transformers (bitwise equal here): FP32_SUM only allows a reordered reduction
    assert_close_rel(out.tokens[0, :276], reference[0, :276], FP32_SUM, "30 s encoder vs transformers")
    assert not out.tokens[0, 276:].any()
    assert_close_rel(out.pooled[0], out.tokens[0, :276].mean(0), FP32_SUM, "pooled", scale=out.tokens[0].abs().max())


def test_a_clip_over_30s_is_cut_and_encodes_like_classic_whisper(encoder, fixed_encoder):
    noise = np.random.default_rng(0).normal(0, 0.05, 31 * SR).astype(np.float32)
    item = wav_bytes(noise)
    var, fixed = encoder.encode([item]), fixed_encoder.encode([item])
    assert var.tokens.shape == fixed.tokens.shape == (1, 1500, 384) and var.mask.all() and fixed.mask.all()
    # a full window needs no mask: the same computation up to the convolutions' input width (3002 vs
    # 3000 mel columns; bitwise equal here): FP32_OPS allows a conv kernel that sums in another order
    assert_close_rel(var.tokens, fixed.tokens, FP32_OPS, "variable vs fixed on a full window")


def test_max_seconds_limits_the_positions():
    enc = make(max_seconds=2.0)
    prepared = enc.prepare(wav_bytes(np.random.default_rng(1).normal(0, 0.1, 3 * SR).astype(np.float32)))
    assert prepared.frames // 2 == 100


def test_bf16_autocast_stays_close_to_fp32(encoder, clips):
    fp32 = encoder.encode(list(clips))
    bf16_encoder = make(autocast="bf16")
    bf16_encoder.encoder, bf16_encoder._loaded = encoder.encoder, True  # share the loaded weights
    bf16 = bf16_encoder.encode(list(clips))
    assert torch.equal(bf16.mask, fp32.mask)
    cos = torch.nn.functional.cosine_similarity(bf16.pooled, fp32.pooled, dim=-1)
    assert (cos > 0.99).all(), cos


def test_bad_inputs_raise_input_error_naming_the_file(encoder, tmp_path, clips):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(np.random.default_rng(2).bytes(3000))
    cut = tmp_path / "cut.wav"
    cut.write_bytes(clips[1][: len(clips[1]) // 3])
    for path, reason in [(empty, "empty file"), (junk, "cannot decode"), (cut, "truncated"),
                         (tmp_path / "missing.wav", "not found")]:
        with pytest.raises(InputError, match=reason) as info:
            encoder.prepare(path)
        assert info.value.what == str(path)
    with pytest.raises(InputError):
        encoder.encode([clips[0], junk])


def test_content_key_follows_the_bytes_not_the_name(encoder, tmp_path, clips):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(clips[0])
    b.write_bytes(clips[0])
    assert encoder.content_key(a) == encoder.content_key(b) == encoder.content_key(clips[0])
    assert encoder.content_key(clips[1]) != encoder.content_key(clips[0])
    assert encoder.describe(clips[0]).startswith("<audio bytes")


def test_token_stride_averages_positions_and_keeps_the_pooled_vector(encoder, clips):
    strided = make(token_stride=4).ensure_loaded()
    one, four = encoder.encode(list(clips)), strided.encode(list(clips))
    for i in range(2):
        n = int(one.mask[i].sum())
        assert int(four.mask[i].sum()) == -(-n // 4)
        # same encoder forward (same batch), then a mean of <= 4 positions in another order
        h = one.tokens[i].abs().max()
        assert_close_rel(four.tokens[i, 1], one.tokens[i, 4:8].mean(0), FP32_SUM, "window 1", scale=h)
        last = (n - 1) // 4  # the last window averages only the clip's own positions
        assert_close_rel(four.tokens[i, last], one.tokens[i, 4 * last : n].mean(0), FP32_SUM, "last window", scale=h)
    assert_close_rel(four.pooled, one.pooled, FP32_SUM, "pooled", scale=one.tokens.abs().max())
    assert strided.cache_id() != encoder.cache_id() and "token_stride" not in encoder.preprocessing()
