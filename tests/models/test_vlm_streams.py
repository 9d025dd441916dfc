"""Several input streams in one decoder: image + audio tokens, mixed-modality batches, ablations.

The property that matters: a sample's answer depends only on its own inputs. An image-only
sample gets the same logits in a batch of image+audio samples as alone, under every fusion,
for the tiny, TRM and LM decoders, so padding and absent streams never leak into attention,
pooling or injection.
"""
import pytest
import torch

from edge_glass.decoders import DECODERS
from edge_glass.decoders.fusion import DECODER_FUSIONS
from edge_glass.decoders.prompt import WordTokenizer, collate
from edge_glass.encoders.base import EncoderOutput
from edge_glass.models.vlm import VLM, Projector, ProjectorConfig, pool_segments, pool_tokens
from numerics import FP32_NET, assert_close_rel, rel_gap

FUSIONS = {"prefix": {}, "cross_attention": {"heads": 2}, "gated": {}}
D_IMG, D_AUD, D = 12, 10, 16
QUESTIONS = ["what color is the shape", "", "is there a red circle", "what shape"]


def clips(lengths, d=D_AUD, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(len(lengths), t, d, generator=g) * mask[..., None]
    return EncoderOutput(tokens, mask, tokens.sum(1) / mask.sum(1, keepdim=True))


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 9, D_IMG, generator=g)
    return EncoderOutput(tokens, torch.ones(n, 9, dtype=torch.bool), tokens.mean(1))


def two_stream_vlm(decoder="tiny", fusion="prefix", seed=0):
    torch.manual_seed(seed)
    tok = WordTokenizer.build(QUESTIONS + ["red", "blue", "yes", "no"])
    cfgs = {"tiny": {"d_model": D, "n_layers": 2, "n_heads": 2}, "trm": {"d_model": D, "n_layers": 1, "n_heads": 2, "n": 1, "T": 1, "n_sup": 2}}
    dec = DECODERS.build(DECODERS.get(decoder).Config(**cfgs[decoder]), tok)
    fus = DECODER_FUSIONS.build(DECODER_FUSIONS.get(fusion).Config(**FUSIONS[fusion]), D, len(dec.blocks()), streams=2)
    if fusion == "gated":  # gates start at 0 (no injection): open them so the test can fail
        with torch.no_grad():
            fus.beta.fill_(0.7)
            fus.extra_beta[0].fill_(-0.4)
    if fusion == "cross_attention":
        with torch.no_grad():
            for layer in fus.layers:
                layer.alpha.fill_(0.8)
    return VLM(dec, fus, Projector(ProjectorConfig(pool="mean", hidden=8), D_IMG, D),
               audio_projector=Projector(ProjectorConfig(pool=3, hidden=8), D_AUD, D, temporal=True)).eval()


def logits(vlm, feats, present, questions, answers):
    enc = collate([vlm.decoder.prompt.encode(q, a) for q, a in zip(questions, answers)], vlm.decoder.prompt.pad_id)
    visual, vmask, segments = vlm.inputs(feats, len(questions), torch.device("cpu"), present)
    prefix, pmask = vlm.fusion.prefix(visual, vmask)
    with vlm.fusion.attached(vlm.decoder, visual, vmask, segments):
        out = vlm.decoder(prefix, enc["input_ids"], enc["attention_mask"], enc["labels"], pmask, return_logits=True)
    text = enc["input_ids"].shape[1]
    return out.logits[:, -text:], enc["attention_mask"].bool()  # the text positions (a prefix fusion puts the streams first)


def test_pool_segments_averages_equal_time_slices_of_each_clip():
    x = clips([6, 4, 2])
    out = pool_segments(x, 3)
    assert out.tokens.shape == (3, 3, D_AUD)
    torch.testing.assert_close(out.tokens[0, 1], x.tokens[0, 2:4].mean(0))  # length 6 -> [0,2) [2,4) [4,6)
    torch.testing.assert_close(out.tokens[1, 0], x.tokens[1, 0:2].mean(0))  # length 4 -> [0,2) [2,3) [3,4)
    torch.testing.assert_close(out.tokens[1, 2], x.tokens[1, 3])
    assert out.mask.tolist() == [[True] * 3, [True] * 3, [True, True, False]]  # length 2: positions 0, 1 -> segments floor(t * 3 / 2) = 0, 1
    torch.testing.assert_close(pool_tokens(x, 3, temporal=True).tokens, out.tokens)


@pytest.mark.parametrize("decoder", ["tiny", "trm"])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_each_sample_answers_from_its_own_inputs_in_a_mixed_batch(decoder, fusion):
    vlm = two_stream_vlm(decoder, fusion)
    img, aud = images(3), clips([7, 5, 3])
    answers = ["red", "yes", "no", "blue"]
    # sample 0: image + audio, 1: audio only, 2: image only, 3: nothing (the empty-prompt prior)
    present = {"image": torch.tensor([True, False, True, False]), "audio": torch.tensor([True, True, False, False])}
    feats = {"image": EncoderOutput(img.tokens[:2], img.mask[:2], img.pooled[:2]),
             "audio": EncoderOutput(aud.tokens[:2, :7], aud.mask[:2, :7], aud.pooled[:2])}
    mixed, mask = logits(vlm, feats, present, QUESTIONS, answers)
    assert torch.isfinite(mixed[mask]).all()
    alone = [
        ({"image": EncoderOutput(img.tokens[:1], img.mask[:1], img.pooled[:1]), "audio": EncoderOutput(aud.tokens[:1], aud.mask[:1], aud.pooled[:1])}, None),
        ({"audio": EncoderOutput(aud.tokens[1:2, :5], aud.mask[1:2, :5], aud.pooled[1:2])}, None),
        ({"image": EncoderOutput(img.tokens[1:2], img.mask[1:2], img.pooled[1:2])}, None),
        ({}, None),
    ]
    for i, (f, p) in enumerate(alone):
        own, own_mask = logits(vlm, f, p, QUESTIONS[i : i + 1], answers[i : i + 1])
        n = int(own_mask.sum())
        assert_close_rel(mixed[i][mask[i]][:n], own[0][own_mask[0]], FP32_NET, f"sample {i} ({decoder}, {fusion}) alone vs in a mixed batch")
    # and the inputs matter: another clip for sample 1 changes its logits
    new = clips([5], seed=7)
    changed, m = logits(vlm, {"audio": new}, None, QUESTIONS[1:2], answers[1:2])
    assert rel_gap(changed[0][m[0]], mixed[1][mask[1]][: int(m.sum())]).ratio > 10 * FP32_NET, "the clip does not reach the logits"


def test_a_two_stream_model_learns_answers_only_the_audio_can_tell():
    """Same image, same (empty) question: the answer is in the clip."""
    vlm = two_stream_vlm("tiny", "prefix").train()
    img = images(1)
    aud = clips([6, 6])
    feats = {"image": EncoderOutput(img.tokens.expand(2, -1, -1), img.mask.expand(2, -1), img.pooled.expand(2, -1)), "audio": aud}
    prompt = vlm.decoder.prompt
    batch = collate([prompt.encode("", a) for a in ("red", "blue")], prompt.pad_id)
    opt = torch.optim.Adam(vlm.parameters(), lr=1e-2)
    for _ in range(120):
        loss = vlm(feats, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert vlm.answer(feats, ["", ""], 3) == ["red", "blue"]
    assert vlm.modality_embedding.shape == (2, D)


def test_gated_fusion_has_a_gate_per_stream_and_keeps_single_stream_names():
    one = DECODER_FUSIONS.build(DECODER_FUSIONS.get("gated").Config(), D, 1)
    two = DECODER_FUSIONS.build(DECODER_FUSIONS.get("gated").Config(), D, 1, streams=2)
    assert set(one.state_dict()) == {"proj.weight", "proj.bias", "beta"}  # image-only runs load as before
    assert set(two.state_dict()) == {"proj.weight", "proj.bias", "beta", "extra_proj.0.weight", "extra_proj.0.bias", "extra_beta.0"}
    with pytest.raises(ValueError, match="2 input streams, built for 1"):
        one.injection(torch.randn(1, 4, D), torch.ones(1, 4, dtype=torch.bool), [slice(0, 2), slice(2, 4)])
