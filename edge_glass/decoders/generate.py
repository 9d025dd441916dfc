"""What every decoder shares: the output type, the prefix/label layout, the answer-token loss,
and greedy token-by-token generation.

Layout of one sequence: ``[prefix (P image tokens)][input_ids (L text tokens)]``. Labels are
given for the text only, aligned with ``input_ids`` (-100 where no loss); the decoder prepends
-100 for the prefix. ``logits[:, i]`` predicts token ``i + 1`` of the joined sequence.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .prompt import IGNORE, PromptFormat, collate_prompts


class DecoderOutput(NamedTuple):
    loss: torch.Tensor | None  # scalar: mean cross-entropy over answer tokens (TRM: + halting loss)
    logits: torch.Tensor | None  # (B, P + L, V) or None when not asked for
    metrics: dict[str, float]  # extra numbers to log (per-step losses, halting accuracy...)


def join_inputs(prefix: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                prefix_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """prefix (B, P, D) + text embeds (B, L, D) -> embeds (B, P+L, D), mask (B, P+L) bool."""
    B, P, _ = prefix.shape
    if attention_mask is None:
        attention_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
    if prefix_mask is None:
        prefix_mask = torch.ones(B, P, dtype=torch.bool, device=prefix.device)
    embeds = torch.cat([prefix.to(text_embeds.dtype), text_embeds], dim=1)
    return embeds, torch.cat([prefix_mask.bool(), attention_mask.bool()], dim=1)


def join_labels(labels: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """labels (B, L) -> (B, P+L) with -100 on the P image slots."""
    pad = torch.full((labels.shape[0], n_prefix), IGNORE, dtype=labels.dtype, device=labels.device)
    return torch.cat([pad, labels], dim=1)


def shifted_targets(labels_full: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B, S) targets: target[:, i] = label[:, i + 1], -100 at the end."""
    return F.pad(labels_full[:, 1:], (0, 1), value=IGNORE)


def answer_loss(logits: torch.Tensor, labels_full: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions. logits (B, S, V), labels (B, S)."""
    targets = shifted_targets(labels_full)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def greedy_generate(decoder: "Decoder", prefix: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, max_new_tokens: int, eos_id: int, pad_id: int,
                    prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding, one token per step, for any Decoder.

    prefix (B, P, D); input_ids (B, L) left-padded prompts; returns (B, N) long, N <= max_new_tokens:
    each row's tokens up to and including its first ``eos_id``, then ``pad_id``. Stops as soon as
    every row has produced EOS. The decoder's ``next_token_logits`` may keep a state (a KV cache)
    between steps; it always receives the whole sequence so far.
    """
    ids = input_ids
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if ids.shape[1] and not bool(mask[:, -1].all()):
        raise ValueError("generate: prompts must be left-padded (the last position of every row real); "
                         "use prompt.collate_prompts")
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out: list[torch.Tensor] = []
    state: Any = None
    for _ in range(max_new_tokens):
        logits, state = decoder.next_token_logits(prefix, ids, mask, prefix_mask, state)
        nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))
        out.append(nxt)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
    if not out:
        return ids.new_zeros((ids.shape[0], 0))
    return torch.stack(out, dim=1)


class Decoder(nn.Module, ABC):
    """Base class of all decoders. Subclasses set ``d_model`` (the prefix width the projector must
    produce) and ``prompt`` (their PromptFormat), and implement ``forward`` and ``next_token_logits``."""

    d_model: int
    prompt: PromptFormat

    @abstractmethod
    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                return_logits: bool = True) -> DecoderOutput:
        ...

    @abstractmethod
    def next_token_logits(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          prefix_mask: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, Any]:
        """Logits (B, V) of the token after the whole sequence, and a state for the next call."""

    def generate(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, eos_id: int | None = None, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy continuation of left-padded prompts; (B, N) token ids (see greedy_generate)."""
        was_training = self.training
        self.eval()
        try:
            return greedy_generate(self, prefix, input_ids, attention_mask, max_new_tokens,
                                   self.prompt.eos_id if eos_id is None else eos_id, self.prompt.pad_id, prefix_mask)
        finally:
            self.train(was_training)

    def answer(self, prefix: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 16,
               prefix_mask: torch.Tensor | None = None) -> list[str]:
        """Answer texts for a batch: prefix (B, P, D) and B questions."""
        batch = collate_prompts([self.prompt.prompt_ids(q) for q in questions], self.prompt.pad_id)
        device = prefix.device
        ids = self.generate(prefix, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            max_new_tokens=max_new_tokens, prefix_mask=prefix_mask)
        return [self.prompt.decode(row.tolist()) for row in ids]

    @abstractmethod
    def token_embedding(self) -> nn.Module:
        """The module that turns input ids into (B, L, d_model) embeddings (fusions hook it)."""

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks whose outputs are hidden states (fusions hook them)."""

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Parameter count (shared/tied tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
