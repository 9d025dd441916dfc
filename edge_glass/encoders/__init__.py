"""Frozen backbones behind one interface (see base.py); importing this registers them all."""
from .base import ENCODERS, EncoderConfig, EncoderOutput, FrozenEncoder
from . import clip, efficientnet, text, whisper  # noqa: F401  (registration)

__all__ = ["ENCODERS", "EncoderConfig", "EncoderOutput", "FrozenEncoder", "build_encoders"]


def build_encoders(cfgs: dict) -> dict[str, FrozenEncoder]:
    """{modality: encoder config} -> {modality: encoder} (weights load lazily)."""
    return {m: ENCODERS.build(c) for m, c in cfgs.items()}
