"""Trainable heads on top of frozen token sequences: poolers, Perceiver resampler, Matryoshka
projection, and fusions of two modalities."""
from .pooling import POOLERS, Pooler
from . import perceiver  # noqa: F401  (registers "perceiver")
from .fusion import FUSIONS, Fusion
from .matryoshka import MatryoshkaProjection, ProjectionConfig

__all__ = ["POOLERS", "Pooler", "FUSIONS", "Fusion", "MatryoshkaProjection", "ProjectionConfig"]
