"""Audio through the data pipeline: variable-length masks survive the feature cache and reach the
heads, batching never changes a clip's embedding, and resampled / stereo inputs land on the
same features as the original telephone-rate recording."""
from __future__ import annotations

from math import gcd

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from edge_glass.config import config_from_dict
from edge_glass.media.audio import load_audio
from edge_glass.features.pipeline import build_paired_data
from edge_glass.data.samples import DataReport, Sample
from edge_glass.encoders.whisper import WhisperAudioEncoder, clip_frames
from edge_glass.errors import ModelNotFoundError
from edge_glass.models.alignment import AlignmentModel
from numerics import FP32_NET, FP32_OPS, assert_close_rel


@pytest.fixture(scope="module")
def whisper():
    enc = WhisperAudioEncoder(WhisperAudioEncoder.Config(batch_size=2))
    try:
        return enc.ensure_loaded()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def clips(data_root):
    """Real recordings of very different lengths: FSDD digits (~0.5 s) and Asterisk prompts (2-6 s)."""
    fsdd = sorted((data_root / "fsdd" / "recordings").glob("*_theo_7.wav"))[:3]
    prompts = sorted((data_root / "asterisk" / "wav").glob("agent-*.wav"))[:3]
    if len(fsdd) < 3 or len(prompts) < 3:
        pytest.skip("FSDD / Asterisk recordings not found under the data root")
    return [str(p) for p in (fsdd[0], prompts[0], fsdd[1], prompts[1], fsdd[2], prompts[2])]


def test_masks_survive_the_cache_and_the_heads_ignore_batch_padding(whisper, text_encoder, clips, tmp_path):
    samples = [Sample(group=c, source=c, audio=c, text=f"clip {i}") for i, c in enumerate(clips)]
    data = build_paired_data(samples, {"audio": whisper, "text": text_encoder}, DataReport(), tmp_path, "float32", progress=False)
    rows = data.rows["audio"]
    feats = data.tables["audio"].batch(rows)
    expected = [clip_frames(len(load_audio(c))) // 2 for c in clips]
    assert feats.mask.sum(1).tolist() == expected and feats.tokens.shape[1] == max(expected)
    assert max(expected) > 4 * min(expected)
    for i, c in enumerate(clips):  # cached (length-sorted batches) == the clip encoded alone
        alone = whisper.encode([c])
        # other batch shapes (padding, masked keys) through Whisper's 4 layers: relative to max |h|
        assert_close_rel(feats.tokens[i, : expected[i]], alone.tokens[0], FP32_NET, f"clip {i} cached vs alone")
    cfg = config_from_dict({"encoders": {"audio": {"type": "whisper"}, "text": {"type": "sentence_transformer"}}, "data": {"train": ["x:y"]},
                            "model": {"dims": [32], "heads": {"audio": {"pooler": {"type": "perceiver", "dim": 32, "latents": 8, "depth": 1, "heads": 4}}}}})
    torch.manual_seed(0)
    model = AlignmentModel(cfg.model, cfg.loss, {"audio": whisper.token_dim, "text": text_encoder.token_dim}).eval()
    with torch.no_grad():
        together = model.embed("audio", feats)[32]
        for i in range(len(clips)):
            # one row (padded to its own length) vs the batch: a 1-layer Perceiver + projection, few ops
            assert_close_rel(model.embed("audio", data.tables["audio"].batch(rows[i : i + 1]))[32][0], together[i], FP32_OPS,
                             f"clip {i} embedded alone vs in the batch")


def test_44k_stereo_flac_of_a_telephone_recording_gives_the_same_features(whisper, data_root, tmp_path):
    path = data_root / "fsdd" / "recordings" / "7_jackson_32.wav"
    x, sr = sf.read(path, dtype="float32")
    assert sr == 8000
    g = gcd(44100, sr)
    up = resample_poly(x, 44100 // g, sr // g).astype(np.float32)
    sf.write(tmp_path / "stereo.flac", np.stack([up, up], axis=1), 44100, subtype="PCM_24")
    a, b = whisper.encode([str(path)]), whisper.encode([str(tmp_path / "stereo.flac")])
    assert a.mask.sum() == b.mask.sum()
    assert torch.nn.functional.cosine_similarity(a.pooled, b.pooled).item() > 0.99
