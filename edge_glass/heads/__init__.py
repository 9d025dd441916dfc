"""Trainable heads on top of frozen token sequences: poolers, Perceiver resampler, Matryoshka projection."""
from .pooling import POOLERS, Pooler
from . import perceiver  # noqa: F401  (registers "perceiver")
from .matryoshka import MatryoshkaProjection, ProjectionConfig

__all__ = ["POOLERS", "Pooler", "MatryoshkaProjection", "ProjectionConfig"]
