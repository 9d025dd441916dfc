"""Prompt and label construction for ``[image slots][prompt][answer]`` sequences.

The image slots are not token ids: decoders place the visual prefix (B, P, D) in front of the
token embeddings and label those P positions -100 themselves (see ``generate.join_labels``).
A prompt format turns a question into the prompt ids and an answer into the answer ids:

    training:   input_ids = prompt_ids(q) + answer_ids(a)       labels = [-100]*len(prompt) + answer_ids(a)
    generation: input_ids = prompt_ids(q)                        the decoder continues it

so the generation prompt is by construction the exact prefix of the training sequence.
``answer_ids`` ends with the token that ends the answer (ChatML ``<|im_end|>``, EOS, ``<eos>``),
which generation stops at. Formats:

  * ``ChatPrompt``  a Hugging Face tokenizer with a chat template (SmolLM2, Qwen2 ChatML...):
    prompt = template(messages, add_generation_prompt=True), i.e. up to and including the
    assistant header; answer = answer text + the end-of-turn token the template puts after it.
  * ``PlainPrompt`` a Hugging Face tokenizer without a template:
    "Question: {q}\\nAnswer:" then " {a}" + EOS.
  * ``WordPrompt``  the word-level ``WordTokenizer`` of the tiny decoders:
    <bos> question words <sep> | answer words <eos>.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One training sequence (token ids only; the image prefix is added by the decoder)."""

    input_ids: list[int]  # prompt ids + answer ids
    labels: list[int]  # -100 on the prompt, the answer ids on the answer
    prompt_len: int


class PromptFormat(ABC):
    """Base class: subclasses implement ``prompt_ids``, ``answer_ids`` and ``decode``."""

    eos_id: int  # the token that ends an answer; generation stops there
    pad_id: int

    @abstractmethod
    def prompt_ids(self, question: str) -> list[int]:
        ...

    @abstractmethod
    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the answer, ending with ``eos_id``."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> answer text (stops at ``eos_id``, drops special tokens, strips)."""

    def encode(self, question: str, answer: str) -> Encoded:
        prompt, ans = self.prompt_ids(question), self.answer_ids(answer)
        return Encoded(prompt + ans, [IGNORE] * len(prompt) + ans, len(prompt))

    def _until_eos(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch: input_ids (B, L) long, attention_mask (B, L) bool,
    labels (B, L) long with -100 on padding."""
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded generation batch: input_ids (B, L) long, attention_mask (B, L) bool.
    Left padding keeps every row's last prompt token at the end, where generation appends."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, L - len(p):] = torch.tensor(list(p))
            mask[i, L - len(p):] = True
    return {"input_ids": ids, "attention_mask": mask}


# --- word-level tokenizer for the tiny decoders ----------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", re.IGNORECASE)


class WordTokenizer:
    """Lower-cased words and single punctuation marks; ids 0-4 are <pad> <unk> <bos> <eos> <sep>."""

    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>")

    def __init__(self, words: Iterable[str]):
        self.tokens = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("WordTokenizer: duplicate words in the vocabulary")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.sep_id = range(5)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> "WordTokenizer":
        """Vocabulary of the words seen at least ``min_count`` times (most frequent first, ties
        alphabetical, so the same texts always give the same ids)."""
        counts = Counter(w for t in texts for w in cls.split(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - len(cls.SPECIALS))]
        return cls(words)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        words = [self.tokens[i] for i in ids if not (skip_special and i < len(self.SPECIALS))]
        return re.sub(r" ([.,!?;:])", r"\1", " ".join(words))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": "edge_glass.word_tokenizer", "version": 1, "tokens": self.tokens}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "edge_glass.word_tokenizer":
            raise ValueError(f"{path}: not a word tokenizer file")
        tokens = data["tokens"]
        if tuple(tokens[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise ValueError(f"{path}: the first tokens must be {cls.SPECIALS}")
        return cls(tokens[len(cls.SPECIALS):])


class WordPrompt(PromptFormat):
    """<bos> question <sep> | answer <eos>."""

    def __init__(self, tokenizer: WordTokenizer):
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id

    def prompt_ids(self, question: str) -> list[int]:
        return [self.tokenizer.bos_id] + self.tokenizer.encode(question) + [self.tokenizer.sep_id]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer.encode(answer) + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._until_eos(ids)).strip()


# --- Hugging Face tokenizers -----------------------------------------------------------------

def _pad_id(tokenizer: Any, fallback: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


class ChatPrompt(PromptFormat):
    """A tokenizer's own chat template: one user turn (the question), one assistant turn.

    The template is rendered as text (so the assistant header and any default system prompt are
    exactly the template's) and tokenized without adding special tokens again. The end-of-turn
    token is read off the template: the special token it writes right after the assistant's text.
    """

    SENTINEL = "EDGEGLASSANSWER"

    def __init__(self, tokenizer: Any, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatPrompt: the tokenizer has no chat template; use PlainPrompt")
        self.tokenizer = tokenizer
        self.system = system
        prompt = self.render("QUESTION")
        full = self.render("QUESTION", self.SENTINEL)
        if not full.startswith(prompt + self.SENTINEL):
            raise ValueError(
                "ChatPrompt: the chat template does not render the assistant turn as the generation "
                f"prompt followed by the answer (prompt ends {prompt[-40:]!r}, conversation continues "
                f"{full[len(prompt):len(prompt) + 40]!r}); use PlainPrompt")
        after = full[len(prompt) + len(self.SENTINEL):]
        specials = sorted({*tokenizer.all_special_tokens, *getattr(tokenizer, "added_tokens_encoder", {})}, key=len, reverse=True)
        end = next((s for s in specials if s and after.startswith(s)), None) or tokenizer.eos_token
        if end is None:
            raise ValueError("ChatPrompt: cannot tell which token ends the assistant turn (no special token after it, no EOS)")
        self.end_token = end
        self.eos_id = tokenizer.convert_tokens_to_ids(end)
        self.pad_id = _pad_id(tokenizer, self.eos_id)

    def messages(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def render(self, question: str, answer: str | None = None) -> str:
        """The template's text: up to the assistant header (answer None) or the whole conversation."""
        return self.tokenizer.apply_chat_template(
            self.messages(question, answer), tokenize=False, add_generation_prompt=answer is None)

    def prompt_ids(self, question: str) -> list[int]:
        return list(self.tokenizer(self.render(question), add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._until_eos(ids), skip_special_tokens=True).strip()


class PlainPrompt(PromptFormat):
    """"Question: {q}\\nAnswer:" then " {a}" + EOS, for tokenizers without a chat template.
    The prompt gets the tokenizer's usual special tokens (e.g. BOS); the answer gets none."""

    def __init__(self, tokenizer: Any, template: str = "Question: {question}\nAnswer:"):
        if tokenizer.eos_token_id is None:
            raise ValueError("PlainPrompt: the tokenizer has no EOS token to end answers with")
        self.tokenizer, self.template = tokenizer, template
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = _pad_id(tokenizer, self.eos_id)

    def prompt_ids(self, question: str) -> list[int]:
        return list(self.tokenizer(self.template.format(question=question))["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._until_eos(ids), skip_special_tokens=True).strip()


def prompt_format_for(tokenizer: Any, style: str = "auto", system: str | None = None) -> PromptFormat:
    """The prompt format for a tokenizer. style: "auto" (chat template if the tokenizer has one,
    else plain), "chat" or "plain". A WordTokenizer always gets WordPrompt."""
    if isinstance(tokenizer, WordTokenizer):
        return WordPrompt(tokenizer)
    if style not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt style {style!r}: expected auto, chat or plain")
    if style == "chat" or (style == "auto" and getattr(tokenizer, "chat_template", None)):
        return ChatPrompt(tokenizer, system=system)
    return PlainPrompt(tokenizer)
