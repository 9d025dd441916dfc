"""The interfaces encoders implement: frozen (pretrained, cached) and trainable.

    item (path | bytes | str | PIL image ...) --prepare--> tensor/object --collate--> batch
    batch --forward--> EncoderOutput(tokens (B, T, D), mask (B, T) bool, pooled (B, D))

FrozenEncoder: weights never change, so outputs are computed once into the feature cache and a
model trains on cached features. TrainableEncoder: weights train with the model (from scratch,
or initialised from a backbone), so the data pipeline keeps prepared inputs and the model runs
the encoder under autograd on every batch.

Encoders are constructed cheaply (config + resolved weight paths) and load their weights on
first use, so a run whose features are all in the cache never loads a backbone. ``fingerprint``
identifies everything that changes the output (weights, preprocessing, precision, code
version) and keys the feature cache.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import hashlib
import json
from typing import Any, ClassVar, Iterable, Literal, NamedTuple, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import EdgeGlassError
from ..registry import Registry
from ..tensors import to_device

ENCODERS = Registry("encoder")


class EncoderOutput(NamedTuple):
    tokens: torch.Tensor  # (B, T, D) token sequence
    mask: torch.Tensor  # (B, T) bool, True where a token is real
    pooled: torch.Tensor  # (B, D) the backbone's own pooled vector

    def to(self, device: torch.device | str) -> "EncoderOutput":
        return EncoderOutput(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def strided(self, stride: int) -> "EncoderOutput":
        """Average every ``stride`` consecutive tokens (over real ones): tokens (B, ceil(T / stride), D),
        a window is real if any of its tokens is; ``pooled`` is unchanged."""
        if stride == 1:
            return self
        b, t, d = self.tokens.shape
        pad = -t % stride
        w = nn.functional.pad(self.mask, (0, pad)).view(b, -1, stride).to(self.tokens.dtype)
        x = nn.functional.pad(self.tokens * self.mask[..., None], (0, 0, 0, pad)).view(b, -1, stride, d).sum(2)
        count = w.sum(2)
        return EncoderOutput(x / count.clamp(min=1)[..., None], count > 0, self.pooled)


class EncoderConfig(BaseModel):
    """Fields shared by every encoder; subclasses add a ``type`` Literal and their own fields."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="pip-packaged name, local path or Hugging Face Hub id")
    batch_size: int = Field(32, ge=1, description="inputs per forward pass when encoding")
    autocast: str = Field("fp32", pattern="^(fp32|bf16)$", description="bf16 autocast while encoding")
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="onnxruntime (frozen encoders, CPU): the backbone is exported once to ONNX into the cache and runs there")

    @model_validator(mode="after")
    def _backend_runs_fp32(self):
        if self.backend == "onnxruntime" and self.autocast != "fp32":
            raise ValueError("backend onnxruntime runs the exported fp32 graph: use autocast fp32")
        return self


class FrozenEncoder(nn.Module, ABC):
    """A pretrained backbone with frozen weights; subclasses implement the five hooks below."""

    modality: ClassVar[str]
    Config: ClassVar[type[EncoderConfig]]
    version: ClassVar[int] = 1  # bump when a code change alters outputs (invalidates caches)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self._loaded = False
        # follows .to(device) before the weights are loaded, so lazily built weights land there too
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    # -- hooks ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def token_dim(self) -> int:
        """D of the token sequence (known without loading weights)."""

    @abstractmethod
    def weights_id(self) -> str:
        """Digest of the weight files (see resolve.content_digest)."""

    @abstractmethod
    def build(self) -> None:
        """Load the backbone weights into submodules (called once, lazily)."""

    @abstractmethod
    def prepare(self, item: Any) -> Any:
        """Decode and preprocess one input; raise InputError if it cannot be used."""

    @abstractmethod
    def collate(self, prepared: list[Any]) -> Any:
        ...

    @abstractmethod
    def encode_batch(self, batch: Any) -> EncoderOutput:
        ...

    @abstractmethod
    def content_key(self, item: Any) -> str:
        """Digest of an input's content (not its name): equal content -> equal features."""

    def length(self, prepared: Any) -> int:
        """Size of one prepared input (frames, characters...) for encoders whose inputs vary in
        size: the feature cache batches similar sizes together to save padding. Encoders of
        fixed-size inputs keep this default."""
        return 0

    def describe(self, item: Any) -> str:
        """How to name an input in messages and reports."""
        return str(item) if not isinstance(item, (bytes, bytearray)) else f"<{len(item)} bytes>"

    def preprocessing(self) -> dict[str, Any]:
        """Everything about input handling that changes outputs (part of the fingerprint)."""
        return {}

    # -- shared machinery --------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        backend = {"backend": self.cfg.backend} if self.cfg.backend != "torch" else {}  # absent = torch: older caches stay valid
        return {
            "encoder": self.cfg.type,  # type: ignore[attr-defined]
            "version": self.version,
            "weights": self.weights_id(),
            "preprocessing": self.preprocessing(),
            "autocast": self.cfg.autocast,
            **backend,
        }

    def cache_id(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return f"{self.modality}-{self.cfg.type}-{hashlib.sha256(blob).hexdigest()[:16]}"  # type: ignore[attr-defined]

    def ensure_loaded(self) -> "FrozenEncoder":
        if not self._loaded:
            self.build()
            self.requires_grad_(False)
            self.eval()
            self.to(self.device)
            self._loaded = True
        return self

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # frozen: batch norm / dropout always in inference mode

    @torch.no_grad()
    def forward(self, batch: Any) -> EncoderOutput:
        """A collated batch (moved to the encoder's device) -> EncoderOutput on that device."""
        if self.cfg.backend == "onnxruntime":  # the network loads only to export its graph (once per machine)
            return frozen_output(self.graph_backend()(batch), owned=True)
        self.ensure_loaded()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16"):
            out = self.encode_batch(to_device(batch, self.device))
        return frozen_output(out)

    # -- graphs (ONNX export and the onnxruntime backend; see graph.py) --------------------------
    graph_input_names: ClassVar[list[str]] = []
    graph_axes: ClassVar[list[dict[int, str]]] = []

    def graph_inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """A collated batch -> the tensors ``graph_forward`` takes."""
        raise EdgeGlassError(f"encoder type {self.cfg.type!r} has no ONNX graph (backend onnxruntime, edge-glass export)")  # type: ignore[attr-defined]

    def graph_forward(self, *inputs: torch.Tensor) -> EncoderOutput:
        """``encode_batch`` on ``graph_inputs``' tensors, with shapes that follow from the inputs'."""
        return self.encode_batch(*inputs)

    def graph_record(self) -> dict[str, Any]:
        """Written beside an exported backbone graph (the network is loaded then) and handed to
        ``graph_ready`` whenever the graph is opened later."""
        return {}

    def graph_ready(self, record: dict[str, Any]) -> None:
        """Make ``graph_inputs`` usable for a graph that exists, without the network: a no-op where
        the inputs are the prepared tensors themselves (images, log-mel); the text encoder loads
        its tokenizer. ``record`` is the graph's ``graph_record`` ({} if there is none)."""

    def graph_backend(self):
        if self.device.type != "cpu":
            raise EdgeGlassError(f"{self.modality} encoder: backend onnxruntime runs on the CPU; use backend torch on {self.device}")
        if getattr(self, "_graph", None) is None:
            from ..paths import cache_root
            from .graph import OnnxBackbone

            self._graph = OnnxBackbone(self, cache_root() / "onnx" / f"{self.cache_id()}.onnx")
        return self._graph

    def encode(self, items: Iterable[Any]) -> EncoderOutput:
        """Prepare, collate and encode a list of inputs (raises InputError on the first bad one)."""
        prepared = [self.prepare(it) for it in items]
        return self(self.collate(prepared))


class TrainableEncoder(nn.Module, ABC):
    """An encoder trained with the model. Implement the hooks; ``forward(batch)`` runs with
    gradients. Its weights are part of the model's state (saved in the run directory)."""

    modality: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(self, cfg: BaseModel):
        super().__init__()
        self.cfg = cfg

    @property
    @abstractmethod
    def token_dim(self) -> int:
        """D of the output tokens."""

    @abstractmethod
    def prepare(self, item: Any) -> Any:
        """Decode and preprocess one input; raise InputError if it cannot be used."""

    @abstractmethod
    def collate(self, prepared: list[Any]) -> Any:
        ...

    @abstractmethod
    def forward(self, batch: Any) -> EncoderOutput:
        ...

    @abstractmethod
    def content_key(self, item: Any) -> str:
        """Digest of an input's content: equal content -> one row in the data tables."""

    def describe(self, item: Any) -> str:
        return str(item) if not isinstance(item, (bytes, bytearray)) else f"<{len(item)} bytes>"

    def encode(self, items: Iterable[Any]) -> EncoderOutput:
        """Prepare, collate and encode a list of inputs on the encoder's device."""
        device = next(self.parameters()).device
        return self(to_device(self.collate([self.prepare(it) for it in items]), device))


Encoder = Union[FrozenEncoder, TrainableEncoder]


def frozen_output(out: EncoderOutput, owned: bool = False) -> EncoderOutput:
    """FrozenEncoder's output contract: float32 tokens with padded positions zeroed, a bool
    mask, float32 pooled (applied to ``encode_batch``'s raw output; exported towers share it).
    ``owned``: the caller owns ``out.tokens`` (a fresh buffer, e.g. ONNX Runtime's output), so
    padding is zeroed in place rather than into a new tensor."""
    mask = out.mask.bool()
    tokens = out.tokens.float()
    pad = ~mask.unsqueeze(-1)
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        tokens = tokens.masked_fill(pad, 0.0)  # a graph has no data-dependent branch
    elif not bool(mask.all()):  # (fixed-size inputs have no padding: nothing to zero)
        tokens = tokens.masked_fill_(pad, 0.0) if owned and tokens is out.tokens else tokens.masked_fill(pad, 0.0)
    return EncoderOutput(tokens, mask, out.pooled.float())


def digest_bytes(*parts: bytes) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p)
    return h.hexdigest()
