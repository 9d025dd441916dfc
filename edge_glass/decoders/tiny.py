"""TinyDecoder: a small causal transformer (RoPE, RMSNorm, SwiGLU) trained from scratch.

    prefix (B, P, D) ++ embed(input_ids) (B, L, D) -> n_layers pre-norm blocks -> RMSNorm
    -> lm_head -> logits (B, P+L, V)

The vocabulary comes from the tokenizer it is built with, normally a ``WordTokenizer`` built
from the training questions and answers (easy-VQA needs ~30 words).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import DECODERS
from .generate import Decoder, DecoderOutput, answer_loss, join_inputs, join_labels
from .layers import BlockStack, RMSNorm
from .prompt import prompt_format_for


class TinyDecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["tiny"] = "tiny"
    vocab_size: int | None = Field(None, ge=1, description="None: the tokenizer's size; larger leaves spare ids")
    d_model: int = Field(256, ge=8, description="width; the projector must output this")
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    ffn_mult: float = Field(2.75, gt=0, description="SwiGLU hidden size = ffn_mult * d_model")
    tie_embeddings: bool = Field(True, description="share the input embedding and output projection")
    dropout: float = Field(0.0, ge=0, lt=1)
    rope_base: float = Field(10000.0, gt=0)


def vocab_size_for(cfg_vocab: int | None, tokenizer: Any) -> int:
    n = len(tokenizer)
    if cfg_vocab is not None and cfg_vocab < n:
        raise ValueError(f"decoder.vocab_size={cfg_vocab} is smaller than the tokenizer's {n} tokens")
    return cfg_vocab or n


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


@DECODERS.register("tiny")
class TinyDecoder(Decoder):
    Config = TinyDecoderConfig

    def __init__(self, cfg: TinyDecoderConfig, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prompt = prompt_format_for(tokenizer)
        self.d_model = cfg.d_model
        self.vocab_size = vocab_size_for(cfg.vocab_size, tokenizer)
        self.embed = nn.Embedding(self.vocab_size, cfg.d_model)
        self.stack = BlockStack(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_mult, cfg.dropout, rope_base=cfg.rope_base)
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        init_weights(self)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                return_logits: bool = True) -> DecoderOutput:
        """prefix (B, P, D), input_ids/attention_mask/labels (B, L) -> loss over answer tokens,
        logits (B, P+L, V)."""
        embeds, mask = join_inputs(prefix, self.embed(input_ids), attention_mask, prefix_mask)
        logits = self.lm_head(self.norm(self.stack(embeds, mask)))
        loss = None if labels is None else answer_loss(logits, join_labels(labels, prefix.shape[1]))
        return DecoderOutput(loss, logits if return_logits else None, {})

    def token_embedding(self) -> nn.Module:
        return self.embed

    def blocks(self) -> list[nn.Module]:
        return list(self.stack.blocks)

    def next_token_logits(self, prefix, input_ids, attention_mask, prefix_mask, state):
        """No cache: the short sequence is recomputed each step. Returns (B, V), None."""
        return self.forward(prefix, input_ids, attention_mask, prefix_mask=prefix_mask).logits[:, -1], None
