"""Audio decoding for encoders: any file libsndfile reads (wav, flac, ogg/vorbis, mp3...) as bytes or
a path -> float32 mono samples at 16 kHz, shape (N,).

Bad inputs raise ``InputError(<file>, <reason>)``: missing or empty files, undecodable bytes,
truncated files (the header promises more frames than the stream holds), no samples after
decoding, non-finite samples. Resampling is polyphase (``scipy.signal.resample_poly``, Kaiser
window), which keeps the frequency content below the new Nyquist frequency intact.
"""
from __future__ import annotations

import io
import math
import os
import struct
from typing import Any

import numpy as np
import soundfile as sf

from ..errors import InputError
from .files import FileSlice, read_bytes

TARGET_SR = 16000
_BLOCK = 4096  # frames per block when counting the decodable frames of a broken file
_MP3_SLACK = 0.05  # an MP3 header's frame count is an estimate (Xing/LAME header or bitrate)


def describe_audio(item: Any) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<audio bytes, {len(item)} B>"
    return str(item)


def audio_bytes(item: Any) -> bytes:
    """Raw encoded bytes of a path/bytes input (for content hashing); raises InputError if unreadable."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if not isinstance(item, (str, os.PathLike, FileSlice)):
        raise InputError(describe_audio(item), f"unsupported audio input type {type(item).__name__} (pass a path or bytes)")
    return read_bytes(item, "audio")


def _wav_header_frames(data: bytes) -> int | None:
    """Frames a RIFF/WAVE header declares (data chunk size / block align); None if not a plain WAV.
    libsndfile silently shortens a truncated WAV, so the header is checked here."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and pos + 20 <= len(data):
            block_align = struct.unpack_from("<H", data, pos + 20)[0]
        elif cid == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _ogg_truncated(data: bytes) -> str | None:
    """Why an Ogg file is cut short (a page runs past the end, or the last page lacks the
    end-of-stream flag), or None. libsndfile reads a truncated Ogg without complaint."""
    if data[:4] != b"OggS":
        return None
    pos, header_type = 0, 0
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS" or pos + 27 > len(data):
            return f"Ogg page at byte {pos} is damaged or cut"
        header_type, n_seg = data[pos + 5], data[pos + 26]
        end = pos + 27 + n_seg + sum(data[pos + 27:pos + 27 + n_seg])
        if pos + 27 + n_seg > len(data) or end > len(data):
            return f"Ogg page at byte {pos} runs past the end of the file"
        pos = end
    return None if header_type & 0x04 else "Ogg stream ends without its end-of-stream page"


def decode_audio(data: bytes, what: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode encoded bytes -> (float32 samples (frames, channels), sample rate), checked for truncation.
    With ``max_seconds`` only that much is decoded (and checked)."""
    if not data:
        raise InputError(what, "empty file")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        ogg = _ogg_truncated(data)
        raise InputError(what, f"truncated: {ogg}" if ogg else f"cannot decode: {_reason(exc)}") from None
    with f:
        sr, declared, fmt = f.samplerate, f.frames, f.format
        limit = math.inf if max_seconds is None else math.ceil(max_seconds * sr)
        wanted = min(declared, limit)
        try:  # one read call: libsndfile 1.2.2 decodes MP3 wrongly when it is read in pieces
            samples = f.read(-1 if max_seconds is None else int(wanted), dtype="float32", always_2d=True)
            error = None
        except (sf.LibsndfileError, RuntimeError) as exc:
            samples, error = np.zeros((0, f.channels), np.float32), _reason(exc)
    got = len(samples) if error is None else _decodable_frames(data)
    header = _wav_header_frames(data)
    if header is not None and header > declared:  # libsndfile silently shortens a truncated WAV
        declared, wanted = header, min(header, limit)
    if error:
        if got < wanted:
            raise InputError(what, f"truncated: header says {declared} frames, got {got} ({error})")
        raise InputError(what, f"cannot decode: {error}")
    ogg = _ogg_truncated(data) if max_seconds is None or got < wanted else None
    if ogg:
        raise InputError(what, f"truncated: {ogg} (decoded {got} frames)")
    slack = int(_MP3_SLACK * wanted) if fmt == "MP3" else 0
    if got < wanted - slack:
        raise InputError(what, f"truncated: header says {declared} frames, got {got}")
    if not got:
        raise InputError(what, "no audio samples after decoding")
    if not np.isfinite(samples).all():
        raise InputError(what, "audio contains NaN or infinite samples")
    return samples, sr


def _decodable_frames(data: bytes) -> int:
    """How many frames decode before an error (for the message about a truncated file)."""
    got = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            while block := len(f.read(_BLOCK, dtype="float32", always_2d=True)):
                got += block
    except (sf.LibsndfileError, RuntimeError):
        pass
    return got


def _reason(exc: Exception) -> str:
    text = str(exc).replace("<_io.BytesIO object", "<bytes").strip()
    if "File does not exist" in text:  # what libsndfile says when no format matches bytes in memory
        return "unrecognised or corrupt audio data"
    if "unimplemented format" in text:
        return "unrecognised or unsupported audio encoding (libsndfile: data in an unimplemented format)"
    if text.startswith("Error opening"):  # "Error opening <bytes at 0x..>: Format not recognised."
        text = text.split(": ", 1)[-1]
    return text.removeprefix("Error : ").rstrip(".") or type(exc).__name__


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) by averaging the channels."""
    return samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int = TARGET_SR) -> np.ndarray:
    """Polyphase resampling of a 1-D signal; output length = ceil(len * sr_out / sr_in)."""
    if sr_in == sr_out:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # imported when needed: a 16 kHz-only user never loads scipy.signal

    g = math.gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


def load_audio(item: Any, sr: int = TARGET_SR, max_seconds: float | None = None) -> np.ndarray:
    """A path or encoded bytes -> float32 mono samples at ``sr`` Hz, shape (N,), N > 0.
    ``max_seconds`` decodes only the beginning of long files."""
    what = describe_audio(item)
    samples, sr_in = decode_audio(audio_bytes(item), what, max_seconds)
    out = resample(to_mono(samples), sr_in, sr)
    if max_seconds is not None:
        out = out[: math.ceil(max_seconds * sr)]
    return out


# -- Whisper's log-mel front end (numpy only, so edge_glass.runtime shares it without torch) -----
WHISPER_HOP, WHISPER_N_FFT = 160, 400  # 25 ms windows every 10 ms at 16 kHz
LOG_FLOOR = -10.0  # log10 of the 1e-10 clamp: what all-zero (padding) frames give


def whisper_clip_frames(n_samples: int) -> int:
    """Mel frames covering ``n_samples`` at 16 kHz, rounded up to even (two per encoder position)."""
    f = max(1, math.ceil(n_samples / WHISPER_HOP))
    return f + (f % 2)


def whisper_log_mel(audio: np.ndarray, filters: np.ndarray, width: int, max_frames: int) -> tuple[np.ndarray, float]:
    """The first ``width`` frames of Whisper's normalised log-mel of ``audio`` zero-padded to
    ``max_frames`` (30 s): returns (mel (n_mels, width) float32, pad value). ``filters`` is
    (n_fft/2 + 1, n_mels) (WhisperFeatureExtractor.mel_filters). Computed on
    min(width, max_frames) * hop samples only (a centred STFT, reflect-padded, periodic Hann
    window, as torch.stft); columns past ``max_frames`` are zeros (the convolution's own padding
    there). The clamp "max - 8" is taken over the computed frames, which equals the max over
    the 30 s window since zero padding sits at the floor."""
    need = min(width, max_frames)
    x = np.zeros(need * WHISPER_HOP, np.float32)
    n = min(len(audio), need * WHISPER_HOP)
    x[:n] = audio[:n]
    half = WHISPER_N_FFT // 2
    padded = np.pad(x, half, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, WHISPER_N_FFT)[::WHISPER_HOP][:need]  # drop the last frame
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WHISPER_N_FFT) / WHISPER_N_FFT)
    spectrum = np.fft.rfft(frames * window, axis=-1)  # (need, n_fft/2 + 1), float64 throughout
    power = spectrum.real ** 2 + spectrum.imag ** 2
    log = np.log10(np.maximum(filters.T.astype(np.float64) @ power.T, 1e-10))  # (n_mels, need)
    floor = max(float(log.max()) - 8.0, LOG_FLOOR)  # frames beyond `need` are all at LOG_FLOOR
    mel = (np.maximum(log, floor) + 4.0) / 4.0
    if width > need:
        mel = np.concatenate([mel, np.zeros((mel.shape[0], width - need), np.float32)], axis=1)
    return mel.astype(np.float32), (floor + 4.0) / 4.0
