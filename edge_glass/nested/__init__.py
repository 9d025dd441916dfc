"""Nested-learning mechanisms: fast-weight token mixers, Titans memory, HOPE self-modifying attention."""
from __future__ import annotations

from .fast_weights import FastWeightAttention, FastWeightState, delta_rule_chunk_step, delta_rule_chunked
from .fast_weights import delta_rule_recurrent, linear_attention, linear_attention_recurrent
from .hope import HopeAttention, HopeState
from .titans import TitansState, memory_grad, memory_loss, titans_memory_chunked, titans_memory_recurrent
from .attention import SoftmaxAttention
from .cms import CMSConfig, CMSLevel, CMSOptimizer, ContinuumMemory, LevelSpec, control_groups, make_optimizer
from .dmgd import DMGD
from .ttt import TTTAdapter, TTTState, initial_state, inner_grad, inner_loss, ttt_linear, ttt_linear_masked
from .ttt import ttt_linear_recurrent
