"""A trainable text encoder: a pretrained tokenizer's ids -> token embedding + a small
Transformer, trained with the model (from scratch, or with the token embeddings initialised
from the tokenizer's own model).

    text --tokenizer--> ids (B, T) + mask --embedding + positions--> (B, T, dim)
    --pre-norm Transformer layers (padding masked)--> LayerNorm --> tokens (B, T, dim), pooled = masked mean
"""
from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ConfigError, InputError
from ..tensors import masked_mean
from ..weights.resolve import resolve
from .base import ENCODERS, EncoderOutput, TrainableEncoder, digest_bytes


class TokenTextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    type: Literal["token_text"] = "token_text"
    tokenizer: str = Field("all-MiniLM-L6-v2", description="a model whose tokenizer splits the text: pip-packaged name, path or hub id")
    dim: int = Field(256, ge=8)
    layers: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    ffn_mult: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(64, ge=2, description="tokens per text (longer texts are cut)")
    init_embeddings: bool = Field(False, description="start from the tokenizer model's token embeddings (needs dim = its hidden size)")
    batch_size: int = Field(64, ge=1, description="texts per forward pass when embedding")


class TokenBatch(NamedTuple):
    ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, T) bool


@ENCODERS.register("token_text")
class TokenTextEncoder(TrainableEncoder):
    modality = "text"
    Config = TokenTextConfig
    cfg: TokenTextConfig

    def __init__(self, cfg: TokenTextConfig):
        super().__init__(cfg)
        from transformers import AutoTokenizer

        self.model_dir = resolve(cfg.tokenizer)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        if cfg.dim % cfg.heads:
            raise ConfigError(f"encoders.text.dim: {cfg.dim} is not divisible by heads {cfg.heads}")
        self.embed = nn.Embedding(len(self.tokenizer), cfg.dim, padding_idx=self.tokenizer.pad_token_id)
        self.positions = nn.Embedding(cfg.max_length, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ffn_mult * cfg.dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False) if cfg.layers else None
        self.norm = nn.LayerNorm(cfg.dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        if cfg.init_embeddings:
            self._init_from_model()

    def _init_from_model(self) -> None:
        from transformers import AutoModel

        hidden = json.loads((self.model_dir / "config.json").read_text()).get("hidden_size")
        if hidden != self.cfg.dim:
            raise ConfigError(f"encoders.text.init_embeddings: {self.cfg.tokenizer}'s embeddings are {hidden}-d; set dim: {hidden}")
        with torch.no_grad():
            self.embed.weight.copy_(AutoModel.from_pretrained(str(self.model_dir)).get_input_embeddings().weight)

    @property
    def token_dim(self) -> int:
        return self.cfg.dim

    def prepare(self, item: Any) -> list[int]:
        if not isinstance(item, str):
            raise InputError(repr(item)[:80], f"text input must be a string, got {type(item).__name__}")
        if not item.strip():
            raise InputError(repr(item), "empty text")
        return self.tokenizer(item, truncation=True, max_length=self.cfg.max_length)["input_ids"]

    def collate(self, prepared: list[list[int]]) -> TokenBatch:
        t = max(len(p) for p in prepared)
        ids = torch.full((len(prepared), t), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prepared):
            ids[i, : len(p)] = torch.tensor(p)
        return TokenBatch(ids, torch.arange(t)[None, :] < torch.tensor([len(p) for p in prepared])[:, None])

    def forward(self, batch: TokenBatch) -> EncoderOutput:
        ids, mask = batch
        x = self.embed(ids) + self.positions.weight[: ids.shape[1]]
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask[..., None]
        return EncoderOutput(x, mask, masked_mean(x, mask))

    def content_key(self, item: Any) -> str:
        return digest_bytes(str(item).encode("utf-8"))

    def describe(self, item: Any) -> str:
        return repr(item) if len(str(item)) < 80 else repr(str(item)[:77] + "...")
