"""Fusion of two modalities' token sequences: shapes, masks, both inputs matter, config checks,
and the fused input ("image+audio") in the model, the loss batch and retrieval."""
from __future__ import annotations

import pytest
import torch

from edge_glass.config import config_from_dict
from edge_glass.features.cache import FeatureTable
from edge_glass.features.pipeline import Batch, PairedData
from edge_glass.data.samples import Sample
from edge_glass.encoders.base import EncoderOutput
from edge_glass.errors import ConfigError
from edge_glass.eval.retrieval import evaluate_retrieval
from edge_glass.heads import FUSIONS
from edge_glass.models.alignment import AlignmentModel
from numerics import FP32_OPS, assert_close_rel

TYPES = ["concat", "cross_attention", "gated"]


def seq(b: int, t: int, d: int, lengths: list[int]) -> EncoderOutput:
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(b, t, d) * mask[..., None]
    return EncoderOutput(tokens, mask, tokens.sum(1))


def build(kind: str, dim: int = 32):
    cfg = FUSIONS.get(kind).Config(dim=dim)
    torch.manual_seed(0)
    return FUSIONS.build(cfg, (12, 8)).eval()


def config(fusion: dict | None, **loss):
    return config_from_dict({
        "encoders": {"image": {"type": "efficientnet_lite"}, "audio": {"type": "whisper"}, "text": {"type": "sentence_transformer"}},
        "model": {"dims": [16, 8], "fusion": fusion}, "loss": loss, "data": {"train": ["x:y"]}})


@pytest.mark.parametrize("kind", TYPES)
def test_fusion_maps_two_sequences_to_one_vector_ignoring_padding(kind):
    fusion = build(kind)
    a, b = seq(3, 5, 12, [5, 2, 3]), seq(3, 7, 8, [1, 7, 4])
    out = fusion(a, b)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    # more padding, filled with garbage the masks hide, changes nothing
    pad_a = EncoderOutput(torch.cat([a.tokens, torch.randn(3, 4, 12)], 1), torch.cat([a.mask, torch.zeros(3, 4, dtype=torch.bool)], 1), a.pooled)
    # (other shapes, so another float32 rounding of a one-block module: relative to the outputs' scale)
    assert_close_rel(fusion(pad_a, b), out, FP32_OPS, f"{kind}: more padding")
    # a row does not depend on the other rows of its batch
    assert_close_rel(fusion(EncoderOutput(*(x[1:2] for x in a)), EncoderOutput(*(x[1:2] for x in b)))[0], out[1], FP32_OPS,
                     f"{kind}: one row alone")


@pytest.mark.parametrize("kind", TYPES)
def test_both_inputs_change_the_fused_vector_and_get_gradients(kind):
    fusion = build(kind).train()
    a, b = seq(2, 5, 12, [5, 3]), seq(2, 6, 8, [6, 2])
    a.tokens.requires_grad_(True)
    b.tokens.requires_grad_(True)
    out = fusion(a, b)
    out.square().sum().backward()
    assert a.tokens.grad[a.mask].abs().sum() > 0 and b.tokens.grad[b.mask].abs().sum() > 0
    with torch.no_grad():
        other_b = seq(2, 6, 8, [6, 2])
        assert not torch.allclose(fusion(a, other_b), out)


def test_config_names_the_fused_input_and_checks_its_pairs():
    cfg = config({"type": "gated", "inputs": ["image", "audio"]}, pairs=["image-text", "image+audio-text"])
    assert cfg.model.fusion.name == "image+audio"
    with pytest.raises(ConfigError, match="image\\+audio-image"):
        config({"type": "gated"}, pairs=["image+audio-image"])
    with pytest.raises(ConfigError, match="model.fusion.inputs"):
        config({"type": "concat", "inputs": ["image", "video"]})
    with pytest.raises(ConfigError, match="model.fusion"):
        config({"type": "mlp"})


def tiny_model(kind: str = "concat") -> AlignmentModel:
    cfg = config({"type": kind, "dim": 16})
    torch.manual_seed(0)
    return AlignmentModel(cfg.model, cfg.loss, {"image": 12, "audio": 8, "text": 10})


def test_model_adds_fused_pairs_and_embeds_only_rows_with_both_inputs():
    model = tiny_model()
    assert model.modalities == ["audio", "image", "text", "image+audio"]
    assert ("image+audio", "text") in model.pairs and ("image+audio", "image") not in model.pairs
    present = {"image": torch.tensor([True, True, False, True]), "audio": torch.tensor([True, False, True, True]), "text": torch.ones(4, dtype=torch.bool)}
    feats = {"image": seq(3, 4, 12, [4, 4, 4]), "audio": seq(3, 5, 8, [5, 2, 3]), "text": seq(4, 3, 10, [3, 3, 3, 3])}
    emb, scales = model(feats, present)
    assert emb["image+audio"][16].shape == (2, 16) and "image+audio__text" in scales
    # rows 0 and 3 have both: image rows 0 and 2 of the image features, audio rows 0 and 2
    ref = model.embed_fused(EncoderOutput(*(x[[0, 2]] for x in feats["image"])), EncoderOutput(*(x[[0, 2]] for x in feats["audio"])))
    torch.testing.assert_close(emb["image+audio"][8], ref[8])
    keys = {"image": torch.tensor([0, 1, -1, 0]), "audio": torch.tensor([4, -1, 5, 4]), "text": torch.arange(4)}
    both, joint = Batch(present, feats, keys).joint("image", "audio")
    assert both.tolist() == [True, False, False, True]
    assert joint[0] == joint[3] and joint[1] == joint[2] == -1  # same image and same clip: one key


def test_retrieval_reports_the_fused_query_against_text():
    model = tiny_model("cross_attention")
    n = 6
    img = FeatureTable(torch.randn(3 * 4, 12), torch.full((3,), 4), torch.randn(3, 12))
    aud = FeatureTable(torch.randn(n * 5, 8), torch.full((n,), 5), torch.randn(n, 8))
    txt = FeatureTable(torch.randn(n * 2, 10), torch.full((n,), 2), torch.randn(n, 10))
    samples = [Sample(group=str(i // 2), source="", image=str(i // 2), audio=f"a{i}", text=f"t{i}") for i in range(n)]
    rows = {"image": torch.arange(n) // 2, "audio": torch.arange(n), "text": torch.arange(n)}
    r = evaluate_retrieval(model, PairedData(samples, rows, {"image": img, "audio": aud, "text": txt}), [1, 5])
    for block in ("image+audio_to_text", "text_to_image+audio", "audio_to_text", "image_to_audio", "audio_to_image"):
        assert set(r[block]) == {"R@1", "R@5"}, block
    assert r["n_image+audio"] == 6 and r["n_images"] == 3 and r["n_audio"] == 6 and r["n_texts"] == 6
    assert r["text_to_image+audio"]["R@5"] >= r["text_to_image+audio"]["R@1"]
