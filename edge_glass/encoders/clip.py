"""Hugging Face CLIPVisionModel as a frozen image encoder (the seeds used clip-vit-large-patch14-336).

(B, 3, S, S) -> hidden states of layer ``layer`` (B, 1 + (S/p)^2, D) as tokens (CLS optionally
dropped); pooled = the model's pooler output (post-layernorm CLS). Preprocessing follows the
model's CLIPImageProcessor config when it has one.
"""
from __future__ import annotations

import json
from typing import Any, Literal

import torch

from ..weights.resolve import content_digest, resolve
from .base import ENCODERS, EncoderOutput
from .image_base import ImageEncoder, ImageEncoderConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class CLIPVisionConfig(ImageEncoderConfig):
    type: Literal["clip_vision"] = "clip_vision"
    model: str = "openai/clip-vit-large-patch14-336"
    layer: int = -1  # which hidden state is the token sequence (LLaVA uses -2)
    drop_cls: bool = False


@ENCODERS.register("clip_vision")
class CLIPVisionEncoder(ImageEncoder):
    Config = CLIPVisionConfig
    cfg: CLIPVisionConfig

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__(cfg)
        self.model_dir = resolve(cfg.model)
        config = json.loads((self.model_dir / "config.json").read_text())
        self.vision_config = config.get("vision_config", config)
        proc_file = self.model_dir / "preprocessor_config.json"
        self.processor = json.loads(proc_file.read_text()) if proc_file.exists() else {}

    @property
    def token_dim(self) -> int:
        return int(self.vision_config["hidden_size"])

    def input_size(self) -> int:
        crop = self.processor.get("crop_size")
        native = crop.get("height") if isinstance(crop, dict) else crop
        return self.cfg.image_size or int(native or self.vision_config.get("image_size", 224))

    def normalisation(self) -> tuple[list[float], list[float]]:
        return list(self.processor.get("image_mean", CLIP_MEAN)), list(self.processor.get("image_std", CLIP_STD))

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "layer": self.cfg.layer, "drop_cls": self.cfg.drop_cls}

    def weights_id(self) -> str:
        return content_digest(self.model_dir)

    def build(self) -> None:
        from transformers import CLIPVisionModel

        self.net = CLIPVisionModel.from_pretrained(str(self.model_dir), dtype=torch.float32)

    def encode_batch(self, pixels: torch.Tensor) -> EncoderOutput:
        out = self.net(pixel_values=pixels, output_hidden_states=True)
        tokens = out.hidden_states[self.cfg.layer]
        if self.cfg.drop_cls:
            tokens = tokens[:, 1:]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens, mask, out.pooler_output)
