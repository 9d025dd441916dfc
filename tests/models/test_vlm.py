import pytest
import torch

from edge_glass.decoders import DECODERS
from edge_glass.decoders.fusion import DECODER_FUSIONS
from edge_glass.decoders.prompt import WordTokenizer
from edge_glass.encoders.base import EncoderOutput
from edge_glass.models.vlm import VLM, ProjectorConfig, VisionProjector, pool_tokens


def grid(b=2, side=7, d=16):
    tokens = torch.randn(b, side * side, d)
    return EncoderOutput(tokens, torch.ones(b, side * side, dtype=torch.bool), tokens.mean(1))


@pytest.mark.parametrize("pool,count", [("none", 49), ("mean", 1), (2, 4), (7, 49)])
def test_projector_pools_the_token_map(pool, count):
    proj = VisionProjector(ProjectorConfig(pool=pool, hidden=8), 16, 12)
    tokens, mask = proj(grid())
    assert tokens.shape == (2, count, 12) and mask.shape == (2, count) and mask.all()


def test_mean_pool_is_the_masked_mean():
    x = grid()
    torch.testing.assert_close(pool_tokens(x, "mean").tokens[:, 0], x.tokens.mean(1))
    with pytest.raises(ValueError, match="square"):
        pool_tokens(EncoderOutput(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 4)), 2)


def tiny_vlm(fusion="prefix"):
    tok = WordTokenizer.build(["what color is the shape", "red", "blue"])
    decoder = DECODERS.build(DECODERS.get("tiny").Config(d_model=16, n_layers=1, n_heads=2), tok)
    f = DECODER_FUSIONS.build(DECODER_FUSIONS.get(fusion).Config(), 16, 1)
    projector = VisionProjector(ProjectorConfig(pool="mean", hidden=8), 16, 16) if f.uses_image else None
    return VLM(decoder, f, projector)


def test_vlm_learns_an_answer_only_the_image_can_tell():
    torch.manual_seed(0)
    vlm = tiny_vlm()
    feats = grid(d=16)
    questions, answers = ["what color is the shape"] * 2, ["red", "blue"]
    prompt = vlm.decoder.prompt
    from edge_glass.decoders.prompt import collate

    batch = collate([prompt.encode(q, a) for q, a in zip(questions, answers)], prompt.pad_id)
    opt = torch.optim.Adam(vlm.parameters(), lr=1e-2)
    for _ in range(150):
        loss = vlm(feats, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert vlm.answer(feats, questions, 3) == answers


def test_question_only_model_has_no_projector_and_ignores_images():
    vlm = tiny_vlm("none")
    assert vlm.projector is None
    a, b = grid(d=16), grid(d=16)
    assert vlm.answer(a, ["what color is the shape"], 3) == vlm.answer(b, ["what color is the shape"], 3)


def test_trainable_state_leaves_out_nothing_trainable():
    vlm = tiny_vlm("cross_attention")
    state = vlm.trainable_state()
    assert {n for n, p in vlm.named_parameters() if p.requires_grad} <= set(state)
