"""Decoder fusions: prefix, cross-attention (tanh gates at zero), gated injection, none — on the
tiny, TRM and Hugging Face (tiny random Qwen2) decoders."""
import pytest
import torch

from edge_glass.decoders import DECODERS
from edge_glass.decoders.fusion import DECODER_FUSIONS
from edge_glass.decoders.lm import LMDecoder, LMDecoderConfig
from edge_glass.decoders.prompt import collate

from .conftest import QUESTIONS
from .test_lm_decoder import tiny_qwen2


def make_decoder(kind, word_tokenizer, qwen2_tokenizer):
    torch.manual_seed(0)
    if kind == "lm":
        return LMDecoder(LMDecoderConfig(lora_r=4, lora_dropout=0.0), tiny_qwen2(qwen2_tokenizer), qwen2_tokenizer)
    cfg = DECODERS.get(kind).Config(d_model=32, n_layers=2, n_heads=4)
    return DECODERS.build(cfg, word_tokenizer)


def run(decoder, fusion, visual, mask):
    batch = collate([decoder.prompt.encode(q, "yes") for q in QUESTIONS[:2]], decoder.prompt.pad_id)
    prefix, pmask = fusion.prefix(visual, mask)
    with fusion.attached(decoder, visual, mask):
        return decoder(prefix, batch["input_ids"], batch["attention_mask"], batch["labels"], pmask).loss


@pytest.mark.parametrize("kind", ["tiny", "trm", "lm"])
@pytest.mark.parametrize("name", ["cross_attention", "gated"])
def test_gated_fusions_start_as_the_image_free_decoder_and_learn_to_use_the_image(kind, name, word_tokenizer, qwen2_tokenizer):
    decoder = make_decoder(kind, word_tokenizer, qwen2_tokenizer).eval()
    d = decoder.d_model
    fusion = DECODER_FUSIONS.build(DECODER_FUSIONS.get(name).Config(**({"heads": 4} if name == "cross_attention" else {})), d, len(decoder.blocks()))
    visual, mask = torch.randn(2, 3, d), torch.ones(2, 3, dtype=torch.bool)
    none = DECODER_FUSIONS.build(DECODER_FUSIONS.get("none").Config(), d, len(decoder.blocks()))
    base = run(decoder, none, visual, mask)
    torch.testing.assert_close(run(decoder, fusion, visual, mask), base)  # tanh(0) = 0: no effect yet
    gate = [p for n, p in fusion.named_parameters() if n.endswith(("alpha", "beta"))]
    with torch.no_grad():
        for p in gate:
            p.fill_(1.0)
    opened = run(decoder, fusion, visual, mask)
    assert not torch.allclose(opened, base)
    assert not torch.allclose(run(decoder, fusion, visual * -3.0, mask), opened)  # the image matters now
    assert all(not b._forward_hooks for b in decoder.blocks()) and not decoder.token_embedding()._forward_hooks


def test_gates_receive_gradient_at_zero(word_tokenizer, qwen2_tokenizer):
    decoder = make_decoder("tiny", word_tokenizer, qwen2_tokenizer)
    fusion = DECODER_FUSIONS.build(DECODER_FUSIONS.get("cross_attention").Config(heads=4), 32, 2)
    run(decoder, fusion, torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)).backward()
    assert all(layer.alpha.grad.abs() > 0 for layer in fusion.layers)


def test_prefix_fusion_puts_the_visual_tokens_in_front(word_tokenizer, qwen2_tokenizer):
    decoder = make_decoder("tiny", word_tokenizer, qwen2_tokenizer).eval()
    fusion = DECODER_FUSIONS.build(DECODER_FUSIONS.get("prefix").Config(), 32, 2)
    visual, mask = torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)
    assert fusion.prefix(visual, mask)[0] is visual
    assert not torch.allclose(run(decoder, fusion, visual, mask), run(decoder, fusion, visual + 1, mask))


def test_cross_attention_every_k_blocks(word_tokenizer, qwen2_tokenizer):
    fusion = DECODER_FUSIONS.build(DECODER_FUSIONS.get("cross_attention").Config(heads=4, every=2), 32, 4)
    assert len(fusion.layers) == 2
