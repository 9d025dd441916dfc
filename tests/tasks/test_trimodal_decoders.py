"""Decoders that hear: spoken questions, speech to text and audio-visual captions, on real data
(easy-VQA images, questions spoken by espeak-ng, FSDD recordings, coco1k photos and captions),
through the vlm task end to end: train -> load -> answer / transcribe -> eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import edge_glass
from edge_glass.config import config_from_dict, load_config, variant_config
from edge_glass.data.qa import read_qa, split_group
from edge_glass.data.samples import DataReport
from edge_glass.data.speech import HELDOUT_POOL, TRAIN_POOL
from edge_glass.data.spoken_qa import TRANSCRIBE
from edge_glass.data.vqa import easy_vqa_dir
from edge_glass.errors import ConfigError
from edge_glass.eval.qa import word_error_rate
from tasks.test_composition import TRM, train_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WHISPER = {"type": "whisper", "model": "whisper-tiny.en", "token_stride": 4}


@pytest.fixture(scope="module")
def easy_vqa_jsonl(tmp_path_factory) -> Path:
    """The first 60 train and 30 test questions of easy-VQA as a QA JSONL file."""
    pytest.importorskip("easy_vqa")
    root = easy_vqa_dir()
    rows = []
    for split, n in (("train", 60), ("test", 30)):
        for q, a, image_id in json.loads((root / split / "questions.json").read_text())[:n]:
            rows.append({"image": str(root / split / "images" / f"{image_id}.png"), "question": q, "answer": a, "split": split})
    path = tmp_path_factory.mktemp("evqa") / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_spoken_qa_holds_out_the_voice_of_the_test_split(easy_vqa_jsonl, espeak):
    report = DataReport()
    samples = read_qa(f"spoken-qa:4:jsonl:{easy_vqa_jsonl}", report)
    assert len(samples) == 90 and not report.skipped
    assert all(s.audio and Path(s.audio).is_file() and s.question for s in samples)  # the text question stays on the sample
    test = [s for s in samples if s.split == "test"]
    train = [s for s in samples if s.split == "train"]
    # one clip per distinct test question (the held-out voice speaks it), never a training clip
    assert len({s.audio for s in test}) == len({s.question for s in test})
    assert not {s.audio for s in test} & {s.audio for s in train}
    # training questions: at most 4 voice variants each, shared across images
    per_question: dict[str, set] = {}
    for s in train:
        per_question.setdefault(s.question, set()).add(s.audio)
    assert max(len(v) for v in per_question.values()) <= 4 and len({s.audio for s in train}) < len(train)
    assert not set(HELDOUT_POOL.voices) & set(TRAIN_POOL.voices)
    again = read_qa(f"spoken-qa:4:jsonl:{easy_vqa_jsonl}", DataReport())
    assert [s.audio for s in again] == [s.audio for s in samples]  # reproducible, synthesised once


def test_transcribe_and_av_captions_specs(fsdd_subset, coco_subset, espeak):
    report = DataReport()
    digits = read_qa(f"transcribe:fsdd:{fsdd_subset}", report)
    assert len(digits) == 80 and {s.kind for s in digits} == {"transcript"} and {s.image for s in digits} == {None}
    assert {s.answer for s in digits} == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert {s.split for s in digits} == {"test", "train"} and all(s.question == TRANSCRIBE for s in digits)
    assert split_group(digits[0]).startswith(digits[0].audio)  # audio-only samples split by their clip
    av = read_qa(f"av-captions:coco:{coco_subset}", report)
    assert av and all(s.image and s.audio and s.kind == "caption" for s in av)
    assert all(Path(s.audio).is_file() for s in av)
    by_image: dict[str, list] = {}
    for s in av:
        by_image.setdefault(s.image, []).append(s)
    assert all(len({s.answer for s in group}) == len(group) >= 2 for group in by_image.values())  # each caption answers once
    assert all(len({s.audio for s in group}) == len(group) for group in by_image.values())  # each caption spoken once


def test_qa_jsonl_rows_with_audio_need_no_question(tmp_path, fsdd_subset):
    clip = next((fsdd_subset / "recordings").iterdir())
    rows = [{"audio": str(clip), "answer": "seven", "kind": "transcript"}, {"audio": "missing.wav", "answer": "x"},
            {"question": "q?", "answer": "x"}, {"audio": str(clip), "question": "", "answer": ""}]
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = DataReport()
    samples = read_qa(f"jsonl:{f}", report)
    assert [(s.image, s.audio, s.question, s.kind) for s in samples] == [(None, str(clip), "", "transcript")]
    assert [(s.source, s.reason.split(" (")[0]) for s in report.skipped] == [
        ("qa.jsonl:2", "audio not found"), ("qa.jsonl:3", "no image path"), ("qa.jsonl:4", "empty answer")]


def test_word_error_rate_counts_edits_over_reference_words():
    r = word_error_rate(["the cat sat", "", "a dog, barked"], ["the cat sat down", "hello there", "A dog barked"])
    assert r == {"wer": 100.0 * 3 / 9, "n": 3, "words": 9}  # 1 deletion + 2 deletions; case and punctuation ignored


def trimodal_cfg(specs: list[str], **over) -> dict:
    cfg = {
        "task": "vlm", "name": "trimodal", "projector": {"pool": "mean", "hidden": 32},
        "audio": {"encoder": WHISPER}, "audio_projector": {"pool": 4, "hidden": 32}, "drop": ["question"],
        "decoder": {**TRM, "n_sup": 2}, "data": {"train": specs, "val": 0.1, "test": 0.2},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2.0e-3, "checkpoint_every": 50, "log_every": 2, "threads": 1},
        "eval": {"max_new_tokens": 3, "samples": 4, "batch_size": 64},
    }
    cfg.update(over)
    return cfg


def test_spoken_vqa_and_speech_to_text_in_one_run(easy_vqa_jsonl, fsdd_subset, tmp_path, espeak, capsys):
    """Mixed batches (image + spoken question, audio only) train, and the run answers, transcribes
    and evaluates with WER through the public API and the CLI."""
    run = train_cli(tmp_path, "mixed", trimodal_cfg([f"spoken-qa:2:jsonl:{easy_vqa_jsonl}", f"transcribe:fsdd:{fsdd_subset}"]))
    result = json.loads((run / "eval.json").read_text())
    assert set(result["by_input"]) == {"image+audio", "audio"} and set(result["by_kind"]) == {"qa", "transcript"}
    assert 0 <= result["wer"] and result["wer_n"] == result["by_kind"]["transcript"]["n"]
    assert json.loads((run / "encoders.json").read_text()).keys() == {"image", "audio"}
    records = json.loads((run / "eval_predictions.json").read_text())
    assert all("audio" in p["given"] and "question" not in p["given"] for p in records)
    assert any(p["question"] for p in records)  # a text question on the sample, dropped by the run
    model = edge_glass.load(run)
    samples = read_qa(f"spoken-qa:2:jsonl:{easy_vqa_jsonl}", DataReport())[:3]
    a = model.answer(images=[s.image for s in samples], audio=[s.audio for s in samples])
    b = model.answer([s.image for s in samples], ["ignored: the run drops text questions"] * 3, audio=[s.audio for s in samples])
    assert a == b and len(a) == 3
    clip = sorted((fsdd_subset / "recordings").iterdir())[0]
    mixed = model.answer(images=[samples[0].image, None], audio=[samples[0].audio, str(clip)])
    assert mixed[0] == a[0]  # the second sample, audio only, does not change the first one's answer
    assert model.transcribe([str(clip)]) == [mixed[1]]  # the run drops text, so transcribe = answer from the clip alone
    capsys.readouterr()
    assert edge_glass.cli.main(["eval", str(run), "--data", f"transcribe:fsdd:{fsdd_subset}", "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    assert "WER" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["wer_n"] == 40  # FSDD's official test takes of the subset


def test_ablation_switches_change_what_the_decoder_gets(easy_vqa_jsonl, tmp_path, espeak):
    cfg = load_config(CONFIGS / "trimodal_ablation.yaml")
    uses = {name: (variant_config(cfg, name).uses("image"), variant_config(cfg, name).uses("audio"), "question" not in variant_config(cfg, name).drop)
            for name in cfg.variants}
    assert uses["image_and_speech"] == (True, True, False) and uses["image_and_text"] == (True, False, True)
    assert uses["image_only"] == (True, False, False) and uses["speech_only"] == (False, True, False) and uses["prior_only"] == (False, False, False)
    spec = [f"spoken-qa:2:jsonl:{easy_vqa_jsonl}"]
    base = {"train": {"epochs": 1, "batch_size": 16, "checkpoint_every": 50, "log_every": 2, "threads": 1}}
    for name, over, streams in [("speech_only", {"drop": ["image", "question"]}, ("audio",)), ("text", {"drop": ["audio"]}, ("image",)),
                                ("gated", {"fusion": {"type": "gated"}}, ("image", "audio"))]:
        run = train_cli(tmp_path, name, trimodal_cfg(spec, **over, **base))
        model = edge_glass.load(run)
        assert model.core.streams == streams
        assert (model.audio_encoder is None) == ("audio" not in streams) and (model.encoder is None) == ("image" in over.get("drop", []))
    with pytest.raises(ConfigError, match="no input stream"):
        config_from_dict(trimodal_cfg(spec, audio=None, drop=["image"]))


def test_decoder_on_an_aligned_audio_head(fsdd_subset, tmp_path, espeak):
    """Phase 1 -> 2 for audio: an audio-text alignment run's frozen Whisper + attention head feed
    a TRM decoder that transcribes digits."""
    align = {"name": "align", "encoders": {"audio": WHISPER, "text": {"type": "sentence_transformer"}},
             "model": {"dims": [32, 16], "heads": {"audio": {"pooler": {"type": "perceiver", "dim": 32, "latents": 4, "depth": 1, "heads": 2}}}},
             "data": {"train": [f"fsdd:{fsdd_subset}"], "split": {"val": 4, "test": 8}},
             "train": {"epochs": 1, "batch_size": 16, "checkpoint_every": 50, "log_every": 2, "threads": 1}}
    aligned = train_cli(tmp_path, "align", align)
    cfg = trimodal_cfg([f"transcribe:fsdd:{fsdd_subset}"], drop=["image", "question"])
    cfg["audio"] = {"encoder": WHISPER, "aligned_run": str(aligned)}
    run = train_cli(tmp_path, "on_aligned", cfg)
    model = edge_glass.load(run)
    assert model.core.audio_head is not None and model.core.audio_head.output == "latents"
    assert not any(k.startswith("audio_head.") for k in model.core.trainable_state())  # the aligned head stays frozen, unsaved
    assert "wer" in json.loads((run / "eval.json").read_text())


def test_shipped_trimodal_configs_validate():
    trm = load_config(CONFIGS / "trimodal_trm.yaml")
    assert trm.uses("image") and trm.uses("audio") and trm.drop == ["question"] and trm.data.train == ["spoken-qa:easy-vqa"]
    qwen = load_config(CONFIGS / "trimodal_qwen.yaml")
    assert qwen.decoder.type == "lm" and qwen.fusion.type == "cross_attention" and qwen.uses("audio")


def test_trimodal_lora_lm_with_cross_attention_trains_and_answers_mixed_batches(easy_vqa_jsonl, fsdd_subset, tmp_path, espeak):
    """The trimodal_qwen path on a tiny random Qwen2 (LoRA, cross-attention after each block)."""
    from helpers import save_tiny_qwen

    lm = save_tiny_qwen(tmp_path / "qwen", layers=2)
    cfg = trimodal_cfg([f"spoken-qa:2:jsonl:{easy_vqa_jsonl}", f"transcribe:fsdd:{fsdd_subset}"],
                       decoder={"type": "lm", "model": str(lm), "lora_r": 4, "lora_dropout": 0.0},
                       fusion={"type": "cross_attention", "heads": 2})
    cfg["data"]["max_samples"] = 24
    run = train_cli(tmp_path, "lm", cfg)
    model = edge_glass.load(run)
    assert model.core.streams == ("image", "audio") and len(model.core.fusion.layers) == 2
    s = read_qa(f"spoken-qa:2:jsonl:{easy_vqa_jsonl}", DataReport())[0]
    clip = str(sorted((fsdd_subset / "recordings").iterdir())[0])
    alone = model.answer(images=[s.image], audio=[s.audio], max_new_tokens=4)
    mixed = model.answer(images=[s.image, None], audio=[s.audio, clip], max_new_tokens=4)
    assert mixed[0] == alone[0]
