"""TRMDecoder: recursion schedule (no-grad repetitions, detached carry), deep supervision,
halting head, causality, generation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_glass.decoders import DECODERS
from edge_glass.decoders.generate import join_labels, shifted_targets
from edge_glass.decoders.prompt import IGNORE, collate
from edge_glass.decoders.trm import TRMDecoder, TRMDecoderConfig, halting_loss

from .conftest import ANSWERS, MEMORY, QUESTIONS, memorise


def trm(tok, **kw) -> TRMDecoder:
    torch.manual_seed(0)
    return TRMDecoder(TRMDecoderConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, **kw}), tok)


def batch_for(dec):
    return collate([dec.prompt.encode(q, a) for q, a in zip(QUESTIONS, ANSWERS)], dec.prompt.pad_id)


def grads(loss, dec):
    params = [p for p in dec.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("n,T,n_sup,halting,n_layers", [(1, 1, 1, False, 1), (2, 2, 2, True, 2), (3, 3, 2, True, 1)])
def test_forward_shapes_and_per_step_metrics_across_settings(word_tokenizer, n, T, n_sup, halting, n_layers):
    dec = trm(word_tokenizer, n=n, T=T, n_sup=n_sup, halting=halting, n_layers=n_layers)
    b = batch_for(dec)
    out = dec(torch.randn(5, 4, 32), **b)
    assert out.logits.shape == (5, 4 + b["input_ids"].shape[1], len(word_tokenizer))
    assert torch.isfinite(out.loss)
    assert sorted(k for k in out.metrics if k.startswith("ce_step")) == [f"ce_step{i}" for i in range(1, n_sup + 1)]
    assert any(k.startswith("halt_acc") for k in out.metrics) == halting
    assert (dec.q_head is not None) == halting


def test_only_the_last_recursion_of_each_step_runs_with_gradients(word_tokenizer):
    n, T, n_sup = 2, 3, 2
    dec = trm(word_tokenizer, n=n, T=T, n_sup=n_sup)
    calls: list[bool] = []
    dec.net.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    dec(torch.randn(5, 4, 32), **batch_for(dec))
    per_step = [False] * ((T - 1) * (n + 1)) + [True] * (n + 1)  # T-1 recursions without grad, then 1 with
    assert calls == per_step * n_sup


@pytest.mark.parametrize("T", [1, 3])  # T=1: the carried state is the only path to an earlier step
def test_gradients_equal_a_reference_with_explicit_no_grad_and_detached_carry(word_tokenizer, T):
    """The model's per-step gradients equal those of a hand-written schedule in which the first
    T-1 recursions run under no_grad and the state passed between steps is detached."""
    dec = trm(word_tokenizer, n=2, T=T, n_sup=2, halting=False)
    b = batch_for(dec)
    prefix = torch.randn(5, 4, 32)
    losses, _, _ = dec.supervision_steps(prefix, b["input_ids"], b["attention_mask"], b["labels"])
    targets = shifted_targets(join_labels(b["labels"], 4))
    x, mask = dec.context(prefix, b["input_ids"], b["attention_mask"], None)
    prepared = dec.net.prepare(mask)
    y, z = dec.init_state(x)
    for step in range(2):
        with torch.no_grad():
            for _ in range(T - 1):
                y, z = dec.latent_recursion(x, y, z, prepared)
        y, z = dec.latent_recursion(x, y, z, prepared)
        ref = F.cross_entropy(dec.lm_head(y).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        assert torch.allclose(losses[step], ref)
        for g_model, g_ref in zip(grads(losses[step], dec), grads(ref, dec)):
            assert (g_model is None and g_ref is None) or torch.allclose(g_model, g_ref, atol=1e-6)
        y, z = y.detach(), z.detach()
    full = dec(prefix, **b).loss
    assert torch.allclose(full, torch.stack(losses).mean())


def test_changing_a_later_token_leaves_earlier_logits_unchanged(word_tokenizer):
    dec = trm(word_tokenizer).eval()
    b = batch_for(dec)
    prefix = torch.randn(5, 4, 32)
    before = dec(prefix, b["input_ids"], b["attention_mask"]).logits
    ids = b["input_ids"].clone()
    ids[:, 6] = (ids[:, 6] + 1) % len(word_tokenizer)
    after = dec(prefix, ids, b["attention_mask"]).logits
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-4)


def test_halting_loss_targets_whether_the_argmax_token_is_right():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # argmax 0, 1, 0
    targets = torch.tensor([[0, 0, IGNORE]])  # right, wrong, unlabelled
    q = torch.tensor([[3.0, -1.0, 50.0]])
    loss, acc = halting_loss(q, logits, targets)
    expected = F.binary_cross_entropy_with_logits(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(loss, expected) and acc == 1.0


@pytest.mark.parametrize("bias,steps", [(10.0, 1), (-10.0, 3)])
def test_inference_stops_after_the_first_step_whose_q_says_halt(word_tokenizer, bias, steps):
    dec = trm(word_tokenizer, n_sup=3).eval()
    torch.nn.init.constant_(dec.q_head.bias, bias)
    calls = []
    dec.net.register_forward_hook(lambda *_: calls.append(1))
    dec.answer(torch.randn(2, 4, 32), QUESTIONS[:2], max_new_tokens=1)
    assert dec.last_sup_steps.tolist() == [steps, steps]
    assert len(calls) == steps * dec.cfg.T * (dec.cfg.n + 1)


def test_without_halting_inference_runs_every_supervision_step(word_tokenizer):
    dec = trm(word_tokenizer, n_sup=3, halting=False).eval()
    dec.answer(torch.randn(2, 4, 32), QUESTIONS[:2], max_new_tokens=1)
    assert dec.last_sup_steps.tolist() == [3, 3]


def test_learns_answers_and_learns_to_halt_early(word_tokenizer):
    dec = trm(word_tokenizer, n=1, T=2, n_sup=2)
    prefixes, loss = memorise(dec, steps=200)
    out = dec(prefixes, **collate([dec.prompt.encode(q, a) for q, a in MEMORY], dec.prompt.pad_id))
    assert out.metrics["ce_step2"] < 0.05 and out.metrics["halt_acc_step1"] == 1.0
    dec.eval()
    assert dec.answer(prefixes, [q for q, _ in MEMORY], max_new_tokens=8) == [a for _, a in MEMORY]
    assert dec.last_sup_steps.tolist() == [1, 1, 1]  # right after one step, and the Q head knows it
    ids = dec.generate(prefixes[:1], torch.tensor([dec.prompt.prompt_ids(MEMORY[0][0])]), max_new_tokens=8)
    assert ids[0].tolist() == dec.prompt.answer_ids(MEMORY[0][1])


def test_built_from_registry_config(word_tokenizer):
    cfg = DECODERS.get("trm").Config.model_validate({"type": "trm", "d_model": 32, "n_heads": 2, "n": 3, "T": 2, "n_sup": 4})
    dec = DECODERS.build(cfg, word_tokenizer)
    assert isinstance(dec, TRMDecoder) and dec.cfg.n_sup == 4
    assert {n for n, _ in dec.named_buffers()} >= {"y_init", "z_init"}
    assert not any(b.requires_grad for b in dec.buffers())
