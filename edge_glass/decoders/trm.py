"""TRMDecoder: a Tiny Recursive Model (Jolicoeur-Martineau 2025, "Less is More: Recursive
Reasoning with Tiny Networks") adapted to next-token decoding.

One tiny causal network f (n_layers post-norm blocks, RoPE) is applied recursively to three
sequences of the same shape (B, S, D), S = P + L:

    x  context: RMSNorm(prefix ++ embed(input_ids))       (fixed)
    y  answer state: lm_head(y)[:, i] predicts token i+1   (init: y_init, a fixed random vector)
    z  latent state                                         (init: z_init, a fixed random vector)

    latent_recursion:  n times z <- f(x + y + z);  then y <- f(y + z)
    deep_recursion:    latent_recursion T times, the first T-1 under no_grad
    deep supervision:  n_sup deep recursions; (y, z) carried detached from one to the next,
                       a loss after each; the returned loss is their mean (training always
                       runs all n_sup steps; halting only shortens inference)

Halting: a Q head reads y at each position and predicts whether the current argmax token there
is correct (BCE against that, on answer positions). At inference the recursion for the next
token stops after the first supervision step whose Q logit at the last position is > 0.
Attention in f is causal, so y at position i only depends on tokens <= i; generation re-runs
the whole recursion on the sequence for every new token (sequences are short).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import DECODERS
from .generate import Decoder, DecoderOutput, join_inputs, join_labels, shifted_targets
from .layers import BlockStack, RMSNorm
from .prompt import IGNORE, prompt_format_for
from .tiny import init_weights, vocab_size_for


class TRMDecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["trm"] = "trm"
    vocab_size: int | None = Field(None, ge=1, description="None: the tokenizer's size")
    d_model: int = Field(256, ge=8, description="width; the projector must output this")
    n_layers: int = Field(2, ge=1, description="layers of the recursively applied network f")
    n_heads: int = Field(4, ge=1)
    ffn_mult: float = Field(2.75, gt=0)
    tie_embeddings: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    rope_base: float = Field(10000.0, gt=0)
    n: int = Field(2, ge=1, description="latent updates z <- f(x+y+z) per recursion")
    T: int = Field(2, ge=1, description="recursions per supervision step; only the last one gets gradients")
    n_sup: int = Field(2, ge=1, description="deep supervision steps (training: all; inference: until halted)")
    halting: bool = Field(True, description="learn a Q head and stop early at inference when it says halt")
    halt_loss_weight: float = Field(0.5, ge=0)


def halting_loss(q: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE of the Q logits against "the argmax token is correct", over labelled positions.
    q (B, S), logits (B, S, V), targets (B, S) with -100 where unlabelled.
    Returns (loss, accuracy of q > 0 as a prediction of correctness)."""
    sel = targets != IGNORE
    correct = (logits.argmax(-1) == targets)[sel].float()
    loss = F.binary_cross_entropy_with_logits(q[sel].float(), correct)
    return loss, ((q[sel] > 0).float() == correct).float().mean()


@DECODERS.register("trm")
class TRMDecoder(Decoder):
    Config = TRMDecoderConfig

    def __init__(self, cfg: TRMDecoderConfig, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prompt = prompt_format_for(tokenizer)
        self.d_model = D = cfg.d_model
        self.vocab_size = vocab_size_for(cfg.vocab_size, tokenizer)
        self.embed = nn.Embedding(self.vocab_size, D)
        self.in_norm = RMSNorm(D)
        self.net = BlockStack(D, cfg.n_layers, cfg.n_heads, cfg.ffn_mult, cfg.dropout, post_norm=True, rope_base=cfg.rope_base)
        self.lm_head = nn.Linear(D, self.vocab_size, bias=False)
        self.q_head = nn.Linear(D, 1) if cfg.halting else None
        init_weights(self)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.q_head is not None:  # start out "never halt", as in TRM
            nn.init.zeros_(self.q_head.weight)
            nn.init.constant_(self.q_head.bias, -5.0)
        self.register_buffer("y_init", nn.init.trunc_normal_(torch.empty(D), std=1.0, a=-2, b=2))
        self.register_buffer("z_init", nn.init.trunc_normal_(torch.empty(D), std=1.0, a=-2, b=2))
        self.last_sup_steps: torch.Tensor | None = None  # (B,) steps used for the last generated token
        self.step_trace: list[torch.Tensor] | None = None  # a list: next_token_logits appends each (B,) last_sup_steps (CPU)

    # -- the recursion ----------------------------------------------------------------------
    def context(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                prefix_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) normalised context embeddings and mask (B, S) bool."""
        embeds, mask = join_inputs(prefix, self.embed(input_ids), attention_mask, prefix_mask)
        return self.in_norm(embeds), mask

    def token_embedding(self) -> nn.Module:
        return self.embed

    def blocks(self) -> list[nn.Module]:
        return list(self.net.blocks)  # applied at every recursion, so a fusion acts at every one

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.y_init.to(x.dtype).expand_as(x), self.z_init.to(x.dtype).expand_as(x)

    def latent_recursion(self, x, y, z, prepared):
        """n updates z <- f(x + y + z), then y <- f(y + z). All (B, S, D)."""
        for _ in range(self.cfg.n):
            z = self.net(x + y + z, prepared=prepared)
        y = self.net(y + z, prepared=prepared)
        return y, z

    def deep_recursion(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        """T latent recursions; gradients flow only through the last. Returns new (y, z)."""
        with torch.no_grad():
            for _ in range(self.cfg.T - 1):
                y, z = self.latent_recursion(x, y, z, prepared)
        return self.latent_recursion(x, y.detach(), z.detach(), prepared)

    def q_logits(self, y: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S) halting logits (> 0: halt)."""
        return self.q_head(y).squeeze(-1)

    # -- training ---------------------------------------------------------------------------
    def supervision_steps(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          labels: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
                          ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, float]]:
        """Runs all n_sup supervision steps. Returns the per-step losses (answer cross-entropy
        + halt_loss_weight * halting BCE; empty without labels), the last step's logits
        (B, P+L, V) and metrics."""
        x, mask = self.context(prefix, input_ids, attention_mask, prefix_mask)
        prepared = self.net.prepare(mask)
        y, z = self.init_state(x)
        targets = None if labels is None else shifted_targets(join_labels(labels, prefix.shape[1]))
        losses, metrics = [], {}
        for step in range(1, self.cfg.n_sup + 1):
            y, z = self.deep_recursion(x, y, z, prepared)
            logits = self.lm_head(y)
            if targets is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
                metrics[f"ce_step{step}"] = float(loss.detach())
                if self.q_head is not None:
                    bce, acc = halting_loss(self.q_logits(y), logits.detach(), targets)
                    loss = loss + self.cfg.halt_loss_weight * bce
                    metrics[f"halt_acc_step{step}"] = float(acc)
                losses.append(loss)
            y, z = y.detach(), z.detach()  # the next step starts from the carried state, no gradient back
        return losses, logits, metrics

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                return_logits: bool = True) -> DecoderOutput:
        """Loss = mean of the per-step losses of all n_sup supervision steps (one backward
        gives the sum of the per-step gradients, each step's graph only reaching its own last
        recursion); logits (B, P+L, V) are the last step's."""
        losses, logits, metrics = self.supervision_steps(prefix, input_ids, attention_mask, labels, prefix_mask)
        loss = torch.stack(losses).mean() if losses else None
        return DecoderOutput(loss, logits if return_logits else None, metrics)

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def think(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Supervision steps until each row halts (Q logit at its last position > 0) or n_sup.
        x (B, S, D), mask (B, S) -> y (B, S, D), steps used per row (B,) long."""
        prepared = self.net.prepare(mask)
        y, z = self.init_state(x)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        steps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.cfg.n_sup):
            y_new, z_new = self.deep_recursion(x, y, z, prepared)
            keep = active[:, None, None]
            y, z = torch.where(keep, y_new, y), torch.where(keep, z_new, z)
            steps += active.long()
            if self.q_head is not None:
                active = active & ~(self.q_logits(y[:, -1:])[:, 0] > 0)
            if not bool(active.any()):
                break
        return y, steps

    def next_token_logits(self, prefix, input_ids, attention_mask, prefix_mask, state):
        """Re-runs the recursion on the whole sequence. Returns (B, V), None; records the
        supervision steps used per row in ``last_sup_steps``."""
        x, mask = self.context(prefix, input_ids, attention_mask, prefix_mask)
        y, self.last_sup_steps = self.think(x, mask)
        if self.step_trace is not None:
            self.step_trace.append(self.last_sup_steps.cpu())
        return self.lm_head(y[:, -1]), None
