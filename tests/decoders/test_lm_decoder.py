"""LMDecoder: a tiny random Qwen2 covers the Qwen code path (LoRA, loss, KV-cache generation
against Hugging Face's own generate); the real SmolLM2-135M-Instruct covers GGUF conversion."""
from __future__ import annotations

import json

import pytest
import torch

from edge_glass.decoders import DECODERS
from edge_glass.decoders.generate import join_inputs, join_labels
from edge_glass.decoders.lm import LMDecoder, LMDecoderConfig
from edge_glass.weights.gguf import convert_gguf, converted_dir
from edge_glass.decoders.prompt import ChatPrompt, collate, collate_prompts
from edge_glass.errors import ConfigError
from numerics import FP32_NET, assert_close_rel

from .conftest import ANSWERS, MEMORY, QUESTIONS, memorise


def tiny_qwen2(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.3)  # big enough for a frozen head to fit
    return AutoModelForCausalLM.from_config(cfg).eval()


def lm(tokenizer, **kw) -> LMDecoder:
    return LMDecoder(LMDecoderConfig(**{"lora_r": 8, "lora_dropout": 0.0, **kw}), tiny_qwen2(tokenizer), tokenizer)


def test_only_lora_adapters_train(qwen2_tokenizer):
    dec = lm(qwen2_tokenizer)
    trainable = [n for n, p in dec.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear = q, k, v, o, gate, up, down in both layers; r * (in + out) each
    per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert dec.num_parameters() == 2 * per_layer
    only_qv = lm(qwen2_tokenizer, lora_target_modules=["q_proj", "v_proj"])
    assert {n.split(".lora_")[0].split(".")[-1] for n, p in only_qv.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    assert lm(qwen2_tokenizer, lora_r=0).num_parameters() == 0
    assert isinstance(dec.prompt, ChatPrompt) and dec.d_model == 64


def test_loss_equals_hugging_face_loss_with_image_slots_and_prompt_ignored(qwen2_tokenizer):
    dec = lm(qwen2_tokenizer)
    b = collate([dec.prompt.encode(q, a) for q, a in zip(QUESTIONS, ANSWERS)], dec.prompt.pad_id)
    prefix = torch.randn(5, 3, 64)
    out = dec(prefix, **b)
    embeds, mask = join_inputs(prefix, dec.embed(b["input_ids"]), b["attention_mask"], None)
    ref = dec.lm(inputs_embeds=embeds, attention_mask=mask.long(), labels=join_labels(b["labels"], 3)).loss
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert out.logits.shape == (5, 3 + b["input_ids"].shape[1], len(qwen2_tokenizer))
    assert dec(prefix, **b, return_logits=False).logits is None


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(qwen2_tokenizer):
    fmt = lm(qwen2_tokenizer).prompt
    b = collate([fmt.encode(QUESTIONS[0], ANSWERS[0])], fmt.pad_id)
    prefix = torch.randn(1, 3, 64)
    results = []
    for ckpt in (False, True):
        dec = lm(qwen2_tokenizer, gradient_checkpointing=ckpt).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in dec.modules()) == ckpt
        torch.manual_seed(1)
        for n, p in dec.named_parameters():  # LoRA B starts at zero: give it values so A gets gradients
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        loss = dec(prefix, **b, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in dec.parameters() if p.requires_grad]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(g0, g1, atol=1e-5) for g0, g1 in zip(results[0][1], results[1][1]))


def test_right_padding_does_not_change_the_logits_of_real_tokens(qwen2_tokenizer):
    dec = lm(qwen2_tokenizer).eval()
    encs = [dec.prompt.encode(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    b = collate(encs, dec.prompt.pad_id)
    prefix = torch.randn(5, 3, 64)
    batched = dec(prefix, b["input_ids"], b["attention_mask"]).logits
    for i, e in enumerate(encs):
        alone = dec(prefix[i:i + 1], torch.tensor([e.input_ids])).logits[0]
        # other shapes (batch of 5, right-padded, masked keys) through 2 layers and the tied head; the
        # logits are large (initializer_range 0.3), so the bound is relative to them
        assert_close_rel(batched[i, : alone.shape[0]], alone, FP32_NET, f"row {i} batched vs alone logits")


def test_kv_cache_generation_equals_recomputation_and_hugging_face_generate(qwen2_tokenizer):
    cached = lm(qwen2_tokenizer).eval()
    p = cached.prompt
    prefix = torch.randn(3, 3, 64)
    batch = collate_prompts([p.prompt_ids(q) for q in QUESTIONS[:3]], p.pad_id)
    with_cache = cached.generate(prefix, batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    cached.cfg = cached.cfg.model_copy(update={"kv_cache": False})
    without = cached.generate(prefix, batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    assert torch.equal(with_cache, without)
    for i, q in enumerate(QUESTIONS[:3]):  # unpadded, one at a time, by transformers' own generate
        ids = torch.tensor([p.prompt_ids(q)])
        embeds = torch.cat([prefix[i:i + 1], cached.embed(ids)], dim=1)
        hf = cached.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=6, do_sample=False, eos_token_id=p.eos_id, pad_token_id=p.pad_id)
        n = hf.shape[1]
        assert with_cache[i, :n].tolist() == hf[0].tolist()


def test_lora_learns_prefix_dependent_answers_in_the_chat_format(qwen2_tokenizer):
    dec = lm(qwen2_tokenizer, lora_r=16, lora_alpha=32)
    prefixes, loss = memorise(dec, steps=120, lr=1e-2)
    assert loss < 0.1
    dec.eval()
    assert dec.answer(prefixes, [q for q, _ in MEMORY], max_new_tokens=8) == [a for _, a in MEMORY]


def test_quantization_without_cuda_is_a_config_error_naming_the_key():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    for q in ("4bit", "8bit"):
        with pytest.raises(ConfigError, match=f"decoder.quantization: '{q}' needs a CUDA GPU"):
            DECODERS.build(LMDecoderConfig(quantization=q))


# --- the real default: SmolLM2-135M-Instruct from its pip-packaged GGUF ---------------------

def test_converted_smollm2_matches_the_gguf_weights_and_saves_plainly(smollm2_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from edge_glass.weights.resolve import packaged_path

    assert json.loads((smollm2_dir / "config.json").read_text()).get("quantization_config") is None
    assert (smollm2_dir / "chat_template.jinja").exists() or "chat_template" in (smollm2_dir / "tokenizer_config.json").read_text()
    reader = GGUFReader(packaged_path("SmolLM2-135M-Instruct"))
    t = next(x for x in reader.tensors if x.name == "blk.3.attn_v.weight")
    expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        got = f.get_tensor("model.layers.3.self_attn.v_proj.weight")
    assert got.shape == expected.shape == (192, 576)
    assert torch.allclose(got, expected)


def test_an_existing_conversion_is_reused_without_loading(smollm2_dir, tmp_path, monkeypatch):
    import transformers

    from edge_glass.weights.resolve import packaged_path

    monkeypatch.setenv("EDGE_GLASS_CACHE", str(tmp_path))
    gguf = packaged_path("SmolLM2-135M-Instruct")
    dest = converted_dir(gguf)
    assert dest.parent == tmp_path / "converted" and dest.name == smollm2_dir.name
    dest.parent.mkdir(parents=True)
    dest.symlink_to(smollm2_dir)

    def no_load(*a, **k):
        raise AssertionError("convert_gguf loaded the GGUF although a converted copy exists")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    assert convert_gguf(gguf) == dest


def test_smollm2_decoder_trains_lora_and_generates_with_its_chat_template(smollm2_dir):
    torch.manual_seed(0)
    dec = LMDecoder(LMDecoderConfig(model=str(smollm2_dir), lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    assert dec.d_model == 576 and isinstance(dec.prompt, ChatPrompt) and dec.prompt.end_token == "<|im_end|>"
    assert dec.num_parameters() == 30 * 4 * ((576 + 576) + (576 + 192))
    b = collate([dec.prompt.encode(q, a) for q, a in zip(QUESTIONS[:2], ANSWERS[:2])], dec.prompt.pad_id)
    prefix = torch.randn(2, 3, 576, requires_grad=True)
    out = dec(prefix, **b, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss) and prefix.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in dec.named_parameters() if p.requires_grad)
    dec.eval()
    p = dec.prompt
    batch = collate_prompts([p.prompt_ids(q) for q in QUESTIONS[:2]], p.pad_id)
    with torch.no_grad():
        ids = dec.generate(prefix, batch["input_ids"], batch["attention_mask"], max_new_tokens=4)
        dec.cfg = dec.cfg.model_copy(update={"kv_cache": False})
        assert torch.equal(ids, dec.generate(prefix, batch["input_ids"], batch["attention_mask"], max_new_tokens=4))
    assert all(isinstance(a, str) for a in dec.answer(prefix.detach(), QUESTIONS[:2], max_new_tokens=4))
