"""Encoders behind one interface (see base.py): frozen backbones (cached) and trainable encoders;
importing this registers them all."""
from .base import ENCODERS, Encoder, EncoderConfig, EncoderOutput, FrozenEncoder, TrainableEncoder
from . import clip, efficientnet, text, token_text, whisper  # noqa: F401  (registration)

__all__ = ["ENCODERS", "Encoder", "EncoderConfig", "EncoderOutput", "FrozenEncoder", "TrainableEncoder", "build_encoders"]


def build_encoders(cfgs: dict) -> dict[str, Encoder]:
    """{modality: encoder config} -> {modality: encoder} (frozen weights load lazily)."""
    return {m: ENCODERS.build(c) for m, c in cfgs.items()}
