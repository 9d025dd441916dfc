"""Decoders: turn a visual prefix (B, P, d_model) plus question tokens into answer tokens.

    DECODERS.build(cfg, tokenizer)   "tiny" (TinyDecoder), "trm" (TRMDecoder): trained from scratch
    DECODERS.build(cfg)              "lm" (LMDecoder): a Hugging Face causal LM with LoRA

All share the Decoder interface in ``generate.py`` (forward -> DecoderOutput(loss, logits,
metrics), generate, answer, num_parameters) and a PromptFormat from ``prompt.py``.
"""
from ..registry import Registry

DECODERS = Registry("decoder")

from . import lm, tiny, trm  # noqa: E402,F401  (register the decoders)
from .generate import Decoder, DecoderOutput  # noqa: E402,F401
