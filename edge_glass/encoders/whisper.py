"""Whisper's audio encoder as a frozen backbone, encoding only as many frames as a clip needs.

    item (path | bytes) --prepare--> AudioFeatures(mel (n_mels, W), frames F)
    --collate--> AudioBatch(mel (B, n_mels, W_max), frames (B,))
    --encode_batch--> tokens (B, T, D) encoder hidden states, mask (B, T) bool, pooled (B, D)

Whisper hears 16 kHz audio as log-mel frames every 10 ms; its encoder turns two frames into one
position (20 ms), so a clip of F frames (rounded up to even) fills T = F / 2 positions, at most
1500 (30 s). tiny.en: D = 384, base: D = 512.

variable_length=True (default): log-mel is computed on the clip's own length, the batch is padded
to its longest clip, the conv stem and the sliced positional table run on that length only, and
the encoder layers hide padded positions from attention. A clip's tokens do not depend on what
else is in its batch: its features are exactly the first F + 2 frames Whisper's 30 s front end
would give (the log-mel clamp "max - 8 dB" is taken over the clip's frames, which equals the max
over the 30 s window since the zero padding sits at the floor), and every real position only sees
frames <= F through the two size-3 convolutions. Tokens on padded positions are set to zero.
What differs from the 30 s encoding is attention: real positions do not attend to trailing silence.

variable_length=False: classic Whisper, every clip padded to 30 s, full attention over the 1500
positions (equal to transformers' WhisperEncoder). The mask still marks only positions covering
real audio (F / 2 of them), so ``pooled`` averages the clip, not 30 s of silence; like every
masked position, the silence positions are zeroed in ``tokens`` (FrozenEncoder's contract).

Clips longer than ``max_seconds`` are cut to it (the fingerprint records the limit).
``token_stride`` s > 1 averages every s consecutive positions into one token (T -> ceil(T / s);
4 gives one token per 80 ms): the heads downstream, whose cost grows with T, run s times faster,
and the feature cache is s times smaller. ``pooled`` is the mean over the clip either way.
"""
from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..weights.ctranslate2 import load_whisper, read_whisper_config, weights_digest
from ..media.audio import TARGET_SR, WHISPER_HOP, WHISPER_N_FFT, audio_bytes, describe_audio, load_audio, whisper_clip_frames, whisper_log_mel
from ..tensors import masked_mean
from .base import ENCODERS, EncoderConfig, EncoderOutput, FrozenEncoder, digest_bytes

SAMPLE_RATE, HOP, N_FFT = TARGET_SR, WHISPER_HOP, WHISPER_N_FFT  # 25 ms windows every 10 ms
clip_frames = whisper_clip_frames


class AudioFeatures(NamedTuple):
    mel: torch.Tensor  # (n_mels, W) normalised log-mel, W = F + 2 (variable) or 3000 (30 s)
    frames: int  # F: even number of frames covering the clip
    pad_value: float  # what Whisper's front end gives on pure padding (for batch padding)


class AudioBatch(NamedTuple):
    mel: torch.Tensor  # (B, n_mels, W_max)
    frames: torch.Tensor  # (B,) long


class WhisperEncoderConfig(EncoderConfig):
    type: Literal["whisper"] = "whisper"
    model: str = "whisper-tiny.en"
    variable_length: bool = Field(True, description="encode only the frames a clip needs (else pad to 30 s)")
    max_seconds: float = Field(30.0, gt=0, le=30.0, description="longer clips are cut to this")
    token_stride: int = Field(1, ge=1, le=16, description="average this many 20 ms positions into one token (4: 80 ms)")


@ENCODERS.register("whisper")
class WhisperAudioEncoder(FrozenEncoder):
    modality = "audio"
    Config = WhisperEncoderConfig
    cfg: WhisperEncoderConfig

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__(cfg)
        self._config = None  # WhisperConfig, read without loading weights
        self._filters: np.ndarray | None = None

    # -- cheap metadata -----------------------------------------------------------------------
    @property
    def whisper_config(self):
        if self._config is None:
            self._config = read_whisper_config(self.cfg.model)
        return self._config

    @property
    def token_dim(self) -> int:
        return self.whisper_config.d_model

    @property
    def max_frames(self) -> int:
        return 2 * self.whisper_config.max_source_positions  # 1500 positions -> 3000 frames (30 s)

    def weights_id(self) -> str:
        return weights_digest(self.cfg.model)

    def preprocessing(self) -> dict[str, Any]:
        stride = {"token_stride": self.cfg.token_stride} if self.cfg.token_stride > 1 else {}  # absent = 1: older caches stay valid
        return {"sr": SAMPLE_RATE, "n_mels": self.whisper_config.num_mel_bins, "hop": HOP, "n_fft": N_FFT,
                "variable_length": self.cfg.variable_length, "max_seconds": self.cfg.max_seconds, **stride}

    # -- inputs ------------------------------------------------------------------------------
    def mel_filters(self) -> np.ndarray:
        if self._filters is None:
            from transformers import WhisperFeatureExtractor

            fe = WhisperFeatureExtractor(feature_size=self.whisper_config.num_mel_bins)
            self._filters = fe.mel_filters.astype(np.float32)  # (n_fft/2 + 1, n_mels)
        return self._filters

    def prepare(self, item: Any) -> AudioFeatures:
        """Decode (16 kHz mono, cut to max_seconds) and compute log-mel; raises InputError."""
        audio = load_audio(item, SAMPLE_RATE, max_seconds=self.cfg.max_seconds)
        frames = min(clip_frames(len(audio)), self.max_frames)
        width = frames + 2 if self.cfg.variable_length else self.max_frames
        mel, pad = whisper_log_mel(audio, self.mel_filters(), width, self.max_frames)
        return AudioFeatures(torch.from_numpy(mel), frames, pad)

    def collate(self, prepared: list[AudioFeatures]) -> AudioBatch:
        width = max(p.mel.shape[1] for p in prepared)
        mel = torch.stack([nn.functional.pad(p.mel, (0, width - p.mel.shape[1]), value=p.pad_value) for p in prepared])
        return AudioBatch(mel, torch.tensor([p.frames for p in prepared], dtype=torch.long))

    def content_key(self, item: Any) -> str:
        return digest_bytes(audio_bytes(item))

    def length(self, prepared: AudioFeatures) -> int:
        return prepared.frames

    def describe(self, item: Any) -> str:
        return describe_audio(item)

    # -- model -------------------------------------------------------------------------------
    def build(self) -> None:
        model, _, _ = load_whisper(self.cfg.model)
        self.encoder = model.get_encoder()  # WhisperEncoder; the decoder is dropped
        self._config = model.config

    def _key_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, T) bool -> attention mask (B, 1, 1, T) hiding padded keys, in the form the layers'
        attention implementation takes (sdpa: bool, True = attend; eager: additive float)."""
        if self.encoder.config._attn_implementation == "sdpa":
            return valid[:, None, None, :]
        return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)[:, None, None, :]

    def encode_batch(self, batch: AudioBatch) -> EncoderOutput:
        return self.encode_mel(batch.mel, batch.frames)

    graph_input_names = ["mel", "frames"]
    graph_axes = [{0: "batch", 2: "half_width"}, {0: "batch"}]

    def graph_inputs(self, batch: AudioBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.mel, batch.frames

    def graph_forward(self, mel: torch.Tensor, frames: torch.Tensor) -> EncoderOutput:
        return self.encode_mel(mel, frames, always_mask=True)

    def encode_mel(self, mel: torch.Tensor, frames: torch.Tensor, always_mask: bool = False) -> EncoderOutput:
        """(B, n_mels, W) log-mel padded as ``collate`` pads it + (B,) frames -> EncoderOutput.
        Shapes follow from W alone (no data-dependent control flow), so the graph exports;
        ``always_mask`` passes the key mask even when no clip is padded (one exported graph)."""
        enc = self.encoder
        mel = mel.to(enc.conv1.weight.device, enc.conv1.weight.dtype)
        x = nn.functional.gelu(enc.conv1(mel))
        x = nn.functional.gelu(enc.conv2(x))  # (B, D, W / 2)
        n_pos = (frames // 2).to(x.device)  # real positions per clip
        # variable length: W = max(frames) + 2, so the longest clip fills W / 2 - 1 positions
        T = x.shape[-1] - 1 if self.cfg.variable_length else enc.config.max_source_positions
        x = x[:, :, :T].transpose(1, 2) + enc.embed_positions.weight[:T]  # (B, T, D)
        valid = torch.arange(T, device=x.device) < n_pos[:, None]  # (B, T)
        masked = self.cfg.variable_length and (always_mask or not bool(valid.all()))
        attn = self._key_mask(valid, x.dtype) if masked else None
        for layer in enc.layers:
            x = layer(x, attn)
        x = enc.layer_norm(x)
        if self.cfg.variable_length:
            x = x.masked_fill(~valid[..., None], 0.0)
        return EncoderOutput(x, valid, masked_mean(x, valid)).strided(self.cfg.token_stride)
