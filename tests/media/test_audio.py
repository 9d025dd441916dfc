"""Audio decoding: real encoded files of each format, resampling against an analytic sine, and
errors that say what is wrong with empty, truncated and undecodable files."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from edge_glass.media.audio import load_audio
from edge_glass.errors import InputError
from edge_glass.paths import data_root

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def encode(x: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=FORMATS[fmt][0], subtype=FORMATS[fmt][1])
    return buf.getvalue()


def dominant_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_decodes_from_path_and_bytes_to_16k_mono(tmp_path, fmt):
    data = encode(sine(440, 22050, 1.0), 22050, fmt)
    path = tmp_path / f"tone.{fmt}"
    path.write_bytes(data)
    from_path, from_bytes = load_audio(path), load_audio(data)
    assert from_path.dtype == np.float32 and from_path.ndim == 1
    np.testing.assert_array_equal(from_path, from_bytes)
    # MP3 frames are padded by the codec; the other formats keep the exact length.
    assert abs(len(from_path) - 16000) <= (1200 if fmt == "mp3" else 0)
    assert abs(dominant_freq(from_path, 16000) - 440) < 2


def test_stereo_44k_is_averaged_to_mono_and_resampled_exactly(tmp_path):
    sr, seconds = 44100, 2.0
    left, right = sine(3000, sr, seconds, 0.6), sine(3000, sr, seconds, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="FLOAT")
    out = load_audio(path)
    assert len(out) == int(seconds * 16000)
    expected = sine(3000, 16000, seconds, 0.4)  # mean of the channels, analytically at 16 kHz
    inner = slice(200, -200)  # the polyphase filter's edge transients
    assert np.abs(out[inner] - expected[inner]).max() < 1e-3  # polyphase: 3e-5; linear interpolation: 9e-3
    assert abs(dominant_freq(out, 16000) - 3000) < 1


def test_8k_telephone_audio_is_upsampled_without_moving_the_frequency():
    out = load_audio(encode(sine(300, 8000, 1.5), 8000, "wav"))
    assert len(out) == 24000
    assert abs(dominant_freq(out, 16000) - 300) < 1
    high = np.abs(np.fft.rfft(out))[np.fft.rfftfreq(len(out), 1 / 16000) > 4100]
    assert high.max() < 1e-3 * np.abs(np.fft.rfft(out)).max()  # no imaging above the old Nyquist


def test_real_fsdd_recording_loads():
    path = data_root() / "fsdd" / "recordings" / "0_george_0.wav"
    if not path.is_file():
        pytest.skip(f"FSDD recordings not found under {path.parent} (set EDGE_GLASS_DATA)")
    info = sf.info(path)
    out = load_audio(path)
    assert info.samplerate == 8000 and len(out) == 2 * info.frames
    assert 0 < np.abs(out).max() <= 1.0


def test_max_seconds_keeps_only_the_beginning():
    out = load_audio(encode(sine(440, 16000, 3.0), 16000, "flac"), max_seconds=1.25)
    assert len(out) == 20000


def expect_error(item, *fragments: str) -> InputError:
    with pytest.raises(InputError) as info:
        load_audio(item)
    for fragment in fragments:
        assert fragment in info.value.reason, info.value.reason
    return info.value


def test_empty_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    err = expect_error(path, "empty file")
    assert err.what == str(path)


def test_truncated_wav_reports_expected_and_decoded_frames(tmp_path):
    data = encode(sine(440, 8000, 1.0), 8000, "wav")
    path = tmp_path / "cut.wav"
    cut = len(data) // 2
    path.write_bytes(data[:cut])
    got = (cut - 44) // 2  # 44-byte canonical header, 2 bytes per 16-bit mono frame
    expect_error(path, f"truncated: header says 8000 frames, got {got}")


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3"])
def test_truncated_compressed_files_are_detected(fmt):
    data = encode(sine(440, 22050, 2.0), 22050, fmt)
    expect_error(data[: len(data) // 2], "truncated")


def test_random_bytes_cannot_be_decoded():
    err = expect_error(np.random.default_rng(0).bytes(4000), "cannot decode")
    assert err.what == "<audio bytes, 4000 B>"


def test_missing_file_and_wrong_input_type(tmp_path):
    expect_error(tmp_path / "nope.wav", "not found")
    expect_error(12345, "unsupported audio input type int")


def test_zero_frames_after_decoding_is_an_error():
    expect_error(encode(np.zeros(0, np.float32), 16000, "wav"), "no audio samples")


def test_non_finite_samples_are_rejected():
    x = sine(440, 16000, 0.5)
    x[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")  # float WAV stores the NaN as is
    expect_error(buf.getvalue(), "NaN")
