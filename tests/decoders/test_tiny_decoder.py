"""TinyDecoder: shapes, answer-only loss, causality, prefix use, config, generation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from edge_glass.decoders import DECODERS
from edge_glass.decoders.prompt import IGNORE, collate
from edge_glass.decoders.tiny import TinyDecoder, TinyDecoderConfig

from .conftest import ANSWERS, MEMORY, QUESTIONS, memorise


def tiny(tok, **kw) -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder(TinyDecoderConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, **kw}), tok)


def batch_for(dec, pairs=tuple(zip(QUESTIONS, ANSWERS))):
    return collate([dec.prompt.encode(q, a) for q, a in pairs], dec.prompt.pad_id)


@pytest.mark.parametrize("d_model,n_layers,n_heads,ffn_mult", [(16, 1, 1, 1.0), (32, 2, 4, 2.75), (48, 3, 3, 4.0)])
def test_forward_shapes_across_sizes(word_tokenizer, d_model, n_layers, n_heads, ffn_mult):
    dec = tiny(word_tokenizer, d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn_mult=ffn_mult)
    b = batch_for(dec)
    out = dec(torch.randn(5, 4, d_model), **b)
    assert out.logits.shape == (5, 4 + b["input_ids"].shape[1], len(word_tokenizer))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_tied_embeddings_share_one_matrix(word_tokenizer):
    tied, untied = tiny(word_tokenizer, tie_embeddings=True), tiny(word_tokenizer, tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == len(word_tokenizer) * 32


def test_loss_is_cross_entropy_on_answer_tokens_only(word_tokenizer):
    dec = tiny(word_tokenizer)
    b = batch_for(dec)
    P = 4
    out = dec(torch.randn(5, P, 32), **b)
    full = torch.cat([torch.full((5, P), IGNORE), b["labels"]], dim=1)
    sel = full[:, 1:] != IGNORE  # logits at i predict token i+1
    expected = F.cross_entropy(out.logits[:, :-1][sel], full[:, 1:][sel])
    assert torch.allclose(out.loss, expected)
    # the gradient reaches the logits only at positions that predict an answer token (or its <eos>)
    logits = out.logits.detach().requires_grad_()
    from edge_glass.decoders.generate import answer_loss
    answer_loss(logits, full).backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched[:, :-1], sel) and not touched[:, -1].any()
    n_answer = sum(len(dec.prompt.answer_ids(a)) for a in ANSWERS)
    assert int(sel.sum()) == n_answer


def test_changing_a_later_token_leaves_earlier_logits_unchanged(word_tokenizer):
    dec = tiny(word_tokenizer).eval()
    b = batch_for(dec)
    prefix = torch.randn(5, 4, 32)
    before = dec(prefix, b["input_ids"], b["attention_mask"]).logits
    ids = b["input_ids"].clone()
    ids[:, 6] = (ids[:, 6] + 1) % len(word_tokenizer)
    after = dec(prefix, ids, b["attention_mask"]).logits
    k = 4 + 6  # position of the changed token in the joined sequence
    assert torch.allclose(before[:, :k], after[:, :k], atol=1e-6)
    assert not torch.allclose(before[:, k:], after[:, k:], atol=1e-4)


def test_text_logits_depend_on_the_prefix_but_not_on_masked_prefix_tokens(word_tokenizer):
    dec = tiny(word_tokenizer).eval()
    b = batch_for(dec)
    prefix = torch.randn(5, 4, 32)
    base = dec(prefix, b["input_ids"], b["attention_mask"]).logits[:, 4:]
    assert not torch.allclose(base, dec(prefix + 1, b["input_ids"], b["attention_mask"]).logits[:, 4:], atol=1e-4)
    pmask = torch.tensor([[True, True, False, False]] * 5)
    changed = prefix.clone()
    changed[:, 2:] = torch.randn(5, 2, 32)
    a = dec(prefix, b["input_ids"], b["attention_mask"], prefix_mask=pmask).logits[:, 4:]
    c = dec(changed, b["input_ids"], b["attention_mask"], prefix_mask=pmask).logits[:, 4:]
    assert torch.allclose(a, c, atol=1e-6)


def test_built_from_registry_config_and_rejects_bad_configs(word_tokenizer):
    cfg = DECODERS.get("tiny").Config.model_validate({"type": "tiny", "d_model": 32, "n_heads": 2, "vocab_size": 64})
    dec = DECODERS.build(cfg, word_tokenizer)
    assert isinstance(dec, TinyDecoder) and dec.lm_head.out_features == 64 and dec.d_model == 32
    with pytest.raises(ValidationError):
        TinyDecoderConfig(d_model=32, layers=4)  # unknown key
    with pytest.raises(ValueError, match="vocab_size"):
        tiny(word_tokenizer, vocab_size=3)
    with pytest.raises(ValueError, match="divisible"):
        tiny(word_tokenizer, n_heads=3)


def test_learns_prefix_dependent_answers_and_generation_stops_at_eos(word_tokenizer):
    dec = tiny(word_tokenizer)
    prefixes, loss = memorise(dec)
    assert loss < 0.05
    assert dec.answer(prefixes, [q for q, _ in MEMORY], max_new_tokens=8) == [a for _, a in MEMORY]
    p = dec.prompt
    ids = dec.generate(prefixes[:1], torch.tensor([p.prompt_ids(MEMORY[0][0])]), max_new_tokens=8)
    assert ids[0].tolist() == p.answer_ids("dark gray")  # "dark gray <eos>", then the loop stopped
