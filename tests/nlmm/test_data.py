"""NL-MM raw-media dataset on real data: COCO photos + captions, FSDD digits and Asterisk prompts
(8 kHz wav, resampled), decoded once into shared tensors; corrupt inputs skipped and reported."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from edge_glass.data.formats import limit_groups, read_dataset
from edge_glass.data.samples import DataReport, Sample
from edge_glass.errors import DataError
from edge_glass.media.audio import load_audio
from edge_glass.nlmm.data import SILENCE, MediaSpec, build_nlmm_data, log_mel, text_vocabulary

SPEC = MediaSpec(image_size=32, n_mels=40, max_audio_seconds=3.0, max_text_tokens=12)


@pytest.fixture(scope="module")
def coco(data_root) -> list[Sample]:
    return limit_groups(read_dataset(f"coco:{data_root / 'coco1k'}", DataReport()), 20)


@pytest.fixture(scope="module")
def speech(data_root, fsdd_subset) -> list[Sample]:
    """4 FSDD digits (< 1 s) and 4 Asterisk prompts (two of them over 5 s: cut at 3 s)."""
    asterisk = data_root / "asterisk" / "transcripts.jsonl"
    if not asterisk.is_file():
        pytest.skip(f"Asterisk prompts not found at {asterisk} (set EDGE_GLASS_DATA to the shared data folder)")
    return read_dataset(f"fsdd:{fsdd_subset}", DataReport())[:4] + read_dataset(f"jsonl:{asterisk}", DataReport())[:4]


@pytest.fixture(scope="module")
def tokenizer(coco, speech):
    return text_vocabulary(coco + speech)


@pytest.fixture(scope="module")
def mixed(coco, speech, tokenizer):
    samples = [x for pair in zip(coco[:8], speech) for x in pair] + coco[8:]  # image-text and audio-text interleaved
    report = DataReport()
    data = build_nlmm_data(samples, tokenizer, SPEC, report)
    assert report.skipped == [] and len(data) == len(samples)
    return data


def expected_image(path: str, size: int) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255 * 2 - 1


def test_coco_batch_shapes_dtypes_and_shared_images(coco, tokenizer):
    data = build_nlmm_data(coco, tokenizer, SPEC, DataReport())
    assert len(data) == len(coco) > 20  # about five captions per image
    assert data.store.images.shape == (20, 3, 32, 32) and data.store.images.dtype == torch.uint8
    assert data.modalities() == {"image", "text"}
    b = data.batch(torch.arange(len(data)))
    n = len(data)
    assert b["image"].shape == (n, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].min() < -0.9 and b["image"].max() > 0.9
    assert b["image_mask"].all() and not b["audio_mask"].any() and b["text_mask"].all()
    assert b["audio"].shape == (n, 1, 40) and (b["audio"] == SILENCE).all() and (b["audio_lengths"] == 0).all()
    assert b["text"].dtype == torch.long and b["text"].shape[1] == int(b["text_lengths"].max()) <= 12 + 2
    for i, (s, row, length) in enumerate(zip(data.samples, b["text"], b["text_lengths"].tolist())):
        assert row[0] == tokenizer.bos_id and row[length - 1] == tokenizer.eos_id and (row[length:] == tokenizer.pad_id).all()
        assert row[1:length - 1].tolist() == tokenizer.encode(s.text)[:12]
        torch.testing.assert_close(b["image"][i], expected_image(s.image, 32), rtol=0, atol=1e-5)
    groups = data.group_ids()
    for i in range(n):
        for j in range(n):
            assert (groups[i] == groups[j]) == (coco[i].group == coco[j].group)
            if coco[i].group == coco[j].group:
                assert data.image_rows[i] == data.image_rows[j]  # one stored image per photo
    assert b["index"].tolist() == list(range(n))


def test_mixed_batch_masks_audio_padding_and_lengths(mixed, speech):
    pos = {id(s): i for i, s in enumerate(mixed.samples)}
    idx = list(range(16))  # alternating image-text / audio-text
    b = mixed.batch(idx)
    is_audio = torch.tensor([mixed.samples[i].audio is not None for i in idx])
    assert is_audio.sum() == 8
    assert torch.equal(b["audio_mask"], is_audio) and torch.equal(b["image_mask"], ~is_audio) and b["text_mask"].all()
    assert (b["image"][is_audio] == 0).all() and (b["audio_lengths"][~is_audio] == 0).all()
    assert mixed.modalities() == {"image", "audio", "text"}
    for s in speech:
        i = pos[id(s)]
        n = b["audio_lengths"][i].item()
        info = sf.info(s.audio)
        resampled = load_audio(s.audio, 16000, max_seconds=3.0)
        assert n == math.ceil(len(resampled) / 160) == math.ceil(min(info.frames * 16000 // info.samplerate, 48000) / 160)
        torch.testing.assert_close(b["audio"][i, :n], torch.from_numpy(log_mel(resampled, 40)), rtol=2e-3, atol=2e-3)
        assert (b["audio"][i, n:] == SILENCE).all()
    assert b["audio"].shape == (16, int(b["audio_lengths"].max()), 40) and b["audio"].shape[1] == 300  # two prompts cut at 3 s
    assert torch.equal(mixed.audio_frames()[idx], b["audio_lengths"])
    assert len(mixed.store.mel_offsets) == 9 and len(mixed.store.mels) == int(b["audio_lengths"].sum())


def test_log_mel_silence_is_the_floor_and_a_sine_peaks_at_its_mel_bin():
    for n in (0, 1, 159, 160, 161, 16000):
        mel = log_mel(np.zeros(n, np.float32), 40)
        assert mel.shape == (max(1, math.ceil(n / 160)), 40) and mel.dtype == np.float32 and (mel == SILENCE).all()
    t = np.arange(16000) / 16000

    def slaney_mel(f: float) -> float:
        return 3 * f / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)

    for freq in (1000.0, 3000.0):
        mel = log_mel(0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32), 40)
        centre = slaney_mel(freq) / (slaney_mel(8000) / 41) - 1  # 40 triangles between 42 evenly spaced mel points
        assert abs(int(mel.mean(0).argmax()) - centre) <= 1.0, (freq, mel.mean(0).argmax(), centre)
        assert mel.max() > SILENCE + 2


def test_log_mel_matches_the_transformers_reference_spectrogram(speech):
    from transformers.audio_utils import spectrogram, window_function

    from edge_glass.nlmm.data import mel_filters

    audio = load_audio(speech[0].audio, 16000)  # a real digit, 8 kHz resampled
    ref = spectrogram(audio, window_function(400, "hann"), frame_length=400, hop_length=160, power=2.0, center=True,
                      mel_filters=mel_filters(40), mel_floor=1e-10, log_mel="log10")  # (n_mels, 1 + len // 160)
    ours = log_mel(audio, 40)
    assert ours.shape == (math.ceil(len(audio) / 160), 40)
    np.testing.assert_allclose(ours, ((ref + 4) / 4).T[: len(ours)], rtol=1e-4, atol=1e-4)


def test_corrupt_inputs_are_skipped_and_reported(tmp_path, coco, speech, tokenizer):
    wav = Path(speech[0].audio).read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav[: len(wav) // 2])  # header intact, body cut
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(coco[0].image).read_bytes()[:600])
    bad = [Sample("cut", "row cut", audio=str(cut), text="two"),
           Sample("broken", "row broken", image=str(broken), text="a broken picture"),
           Sample(coco[0].group, "row blank", image=coco[0].image, text="   "),
           Sample("missing", "row missing", audio=str(tmp_path / "missing.wav"), text="one")]
    good = [coco[0], speech[0], coco[5]]
    samples = [good[0], bad[0], bad[1], good[1], bad[2], bad[3], good[2]]
    report = DataReport()
    data = build_nlmm_data(samples, tokenizer, SPEC, report)
    assert [s.source for s in data.samples] == [s.source for s in good]  # order kept
    reasons = {s.source: (s.reason, s.input) for s in report.skipped}
    assert set(reasons) == {"row cut", "row broken", "row blank", "row missing"}
    assert reasons["row cut"][0].startswith("truncated: header says") and reasons["row cut"][1] == str(cut)
    assert reasons["row broken"][0].startswith("corrupt image") and reasons["row broken"][1] == str(broken)
    assert reasons["row blank"] == ("empty caption", coco[0].image)
    assert reasons["row missing"] == ("audio file not found", str(tmp_path / "missing.wav"))
    assert data.store.images.shape[0] == 2 and len(data.store.mel_offsets) == 2  # nothing stored for the skipped
    with pytest.raises(DataError, match="no usable samples: all 2 were skipped"):
        build_nlmm_data(bad[:2], tokenizer, SPEC, DataReport())


def test_without_a_tokenizer_text_is_ignored(coco, speech):
    report = DataReport()
    text_only = Sample("t", "row text", text="only words")
    data = build_nlmm_data([coco[0], speech[0], text_only], None, SPEC, report)
    assert len(data) == 2 and [s.source for s in report.skipped] == ["row text"]
    b = data.batch([0, 1])
    assert not b["text_mask"].any() and b["text"].shape == (2, 2) and (b["text"] == 0).all()
    assert data.modalities() == {"image", "audio"}


def test_select_is_a_view_and_batches_like_the_parent(mixed):
    view = mixed.select([15, 3, 4, 9])
    for name in ("images", "mels", "tokens"):
        assert getattr(view.store, name).data_ptr() == getattr(mixed.store, name).data_ptr()
    assert [s.source for s in view.samples] == [mixed.samples[i].source for i in (15, 3, 4, 9)]
    vb, pb = view.batch(torch.tensor([1, 2, 0])), mixed.batch([3, 4, 15])
    assert vb["index"].tolist() == [1, 2, 0] and pb["index"].tolist() == [3, 4, 15]
    for key in pb:
        if key != "index":
            assert torch.equal(vb[key], pb[key]), key
    assert torch.equal(view.audio_frames(), mixed.audio_frames()[[15, 3, 4, 9]])
    assert view.group_ids().tolist() == [0, 1, 2, 3]


def test_threaded_decoding_is_deterministic(mixed, tokenizer):
    threaded = build_nlmm_data(mixed.samples, tokenizer, SPEC, DataReport(), workers=2)
    for name in ("images", "mels", "mel_offsets", "tokens", "token_lengths"):
        assert torch.equal(getattr(threaded.store, name), getattr(mixed.store, name)), name
    for name in ("image_rows", "audio_rows", "text_rows"):
        assert torch.equal(getattr(threaded, name), getattr(mixed, name)), name
