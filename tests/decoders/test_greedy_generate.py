"""Greedy generation shared by the decoders: EOS handling, padding, batching."""
from __future__ import annotations

import pytest
import torch

from edge_glass.decoders.prompt import collate_prompts
from edge_glass.decoders.tiny import TinyDecoder, TinyDecoderConfig

from .conftest import MEMORY, memorise


@pytest.fixture(scope="module")
def trained(word_tokenizer):
    torch.manual_seed(0)
    dec = TinyDecoder(TinyDecoderConfig(d_model=32, n_layers=2, n_heads=2), word_tokenizer)
    prefixes, _ = memorise(dec)
    return dec.eval(), prefixes


def test_rows_finish_independently_and_are_padded_after_eos(trained):
    dec, prefixes = trained
    p = dec.prompt
    batch = collate_prompts([p.prompt_ids(q) for q, _ in MEMORY], p.pad_id)
    ids = dec.generate(prefixes, batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    longest = max(len(p.answer_ids(a)) for _, a in MEMORY)
    assert ids.shape == (3, longest)  # stopped once every row had its EOS, not at max_new_tokens
    for row, (_, answer) in zip(ids.tolist(), MEMORY):
        want = p.answer_ids(answer)
        assert row == want + [p.pad_id] * (longest - len(want))


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(trained):
    dec, prefixes = trained
    p = dec.prompt
    batch = collate_prompts([p.prompt_ids(q) for q, _ in MEMORY], p.pad_id)
    assert not batch["attention_mask"].all()  # the prompts differ in length: padding is exercised
    together = dec.generate(prefixes, batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    for i, (q, _) in enumerate(MEMORY):
        alone = dec.generate(prefixes[i:i + 1], torch.tensor([p.prompt_ids(q)]), max_new_tokens=10)
        assert together[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_max_new_tokens_caps_generation_and_right_padding_is_refused(trained):
    dec, prefixes = trained
    p = dec.prompt
    ids = dec.generate(prefixes[:1], torch.tensor([p.prompt_ids(MEMORY[0][0])]), max_new_tokens=1)
    assert ids.shape == (1, 1)
    right = torch.tensor([p.prompt_ids(MEMORY[0][0]) + [p.pad_id]])
    mask = torch.ones_like(right, dtype=torch.bool)
    mask[0, -1] = False
    with pytest.raises(ValueError, match="left-padded"):
        dec.generate(prefixes[:1], right, mask)


def test_generate_restores_training_mode(trained):
    dec, prefixes = trained
    dec.train()
    dec.answer(prefixes[:1], [MEMORY[0][0]])
    assert dec.training
    dec.eval()
