"""The tri-modal loss: one InfoNCE per modality pair over the samples that have both, so a batch
mixing image-text, audio-text and image-audio-text samples trains every pair it can; pair
weights apply whichever way round a pair is written; a fused input is one more modality."""
from __future__ import annotations

import pytest
import torch

from edge_glass.config import config_from_dict
from edge_glass.features.pipeline import Batch
from edge_glass.encoders.base import EncoderOutput
from edge_glass.losses import matryoshka_info_nce
from edge_glass.models.alignment import AlignmentModel
from edge_glass.tasks.alignment import contrastive_loss

DIMS = {"image": 12, "audio": 8, "text": 10}


def model(fusion=None, **loss) -> AlignmentModel:
    cfg = config_from_dict({"encoders": {"image": {"type": "efficientnet_lite"}, "audio": {"type": "whisper"}, "text": {"type": "sentence_transformer"}},
                            "model": {"dims": [16, 8], "fusion": fusion}, "loss": loss, "data": {"train": ["x:y"]}})
    torch.manual_seed(0)
    return AlignmentModel(cfg.model, cfg.loss, DIMS)


def batch() -> Batch:
    """Rows 0-2 image-text (COCO), 3-5 audio-text (Asterisk), 6-8 image-audio-text (spoken COCO)."""
    present = {"image": torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool),
               "audio": torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool),
               "text": torch.ones(9, dtype=torch.bool)}
    torch.manual_seed(1)
    feats = {m: EncoderOutput(torch.randn(int(p.sum()), 3, DIMS[m]), torch.ones(int(p.sum()), 3, dtype=torch.bool), torch.zeros(int(p.sum()), DIMS[m]))
             for m, p in present.items()}
    keys = {m: torch.where(p, torch.arange(9), -1) for m, p in present.items()}
    return Batch(present, feats, keys)


def expected(core: AlignmentModel, b: Batch, weights: dict[str, float]) -> torch.Tensor:
    emb, scales = core(b.features, b.present)
    total = torch.zeros(())
    for x, y in core.pairs:
        both = b.present[x] & b.present[y]
        ex = {d: torch.zeros(9, d).index_put((b.present[x].nonzero().squeeze(1),), e)[both] for d, e in emb[x].items()}
        ey = {d: torch.zeros(9, d).index_put((b.present[y].nonzero().squeeze(1),), e)[both] for d, e in emb[y].items()}
        loss = matryoshka_info_nce(ex, ey, scales[f"{x}__{y}"], b.keys[x][both], b.keys[y][both], {16: 1.0, 8: 1.0})
        total = total + weights.get(f"{x}-{y}", 1.0) * loss
    return total


def test_each_pair_is_trained_on_the_samples_that_have_both():
    core = model()
    b = batch()
    got = contrastive_loss(core, core, b, {16: 1.0, 8: 1.0}, {})
    torch.testing.assert_close(got, expected(core, b, {}))
    # image-audio sees only the 3 spoken-COCO rows: changing an Asterisk clip leaves it alone
    only_ia = model(pairs=["audio-image"])
    before = contrastive_loss(only_ia, only_ia, b, {16: 1.0}, {})
    b.features["audio"].tokens[0] += 5.0  # audio row 0 = sample 3, an audio-text sample
    assert contrastive_loss(only_ia, only_ia, b, {16: 1.0}, {}) == before


@pytest.mark.parametrize("written", ["image-audio", "audio-image"])
def test_pair_weights_apply_whichever_way_a_pair_is_written(written):
    core = model(pair_weights={written: 0.25})
    b = batch()
    got = contrastive_loss(core, core, b, {16: 1.0, 8: 1.0}, {written: 0.25})
    torch.testing.assert_close(got, expected(core, b, {"audio-image": 0.25}))


def test_a_fused_input_adds_its_loss_on_rows_with_both_parts():
    core = model({"type": "gated", "dim": 16})
    b = batch()
    plain = contrastive_loss(core, core, b, {16: 1.0}, {"image+audio-text": 0.0})
    fused = contrastive_loss(core, core, b, {16: 1.0}, {})
    emb, scales = core(b.features, b.present)
    both, keys = b.joint("image", "audio")
    text = emb["text"][16][both]
    torch.testing.assert_close(fused - plain, matryoshka_info_nce({16: emb["image+audio"][16]}, {16: text}, scales["image+audio__text"],
                                                                  keys[both], b.keys["text"][both], {16: 1.0}))
