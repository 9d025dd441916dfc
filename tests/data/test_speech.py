"""Spoken captions: `edge-glass speak` turns an image-caption dataset into image-audio-text
triples with varied espeak-ng voices, reproducibly, reusing what it already synthesised."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

from edge_glass.cli import main
from edge_glass.media.audio import load_audio
from edge_glass.data.formats import read_dataset
from edge_glass.data.samples import DataReport
from edge_glass.data.speech import HELDOUT_POOL, TRAIN_POOL, VoicePool


def speak(*args: str) -> None:
    assert main(["speak", *args]) == 0  # the CLI's entry point, in process

def test_speak_writes_mp3_triples_that_the_jsonl_reader_loads(espeak, coco_subset, tmp_path):
    out = tmp_path / "spoken"
    speak(f"coco:{coco_subset}", "--out", str(out), "--max-groups", "3", "--format", "mp3")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    captions = read_dataset(f"coco:{coco_subset}")
    first3 = list(dict.fromkeys(s.group for s in captions))[:3]
    assert len(rows) == sum(s.group in first3 for s in captions)
    samples = read_dataset(f"jsonl:{out / 'manifest.jsonl'}")
    assert all(s.modalities() == ("image", "audio", "text") for s in samples)
    assert {s.group for s in samples} == set(first3)  # captions of one image stay one group
    for s in samples[:3]:
        assert s.audio.endswith(".mp3")
        speech = load_audio(s.audio)
        assert len(speech) > 0.5 * 16000 and np.abs(speech).max() > 0.05  # real speech, not silence
    assert len({(r["voice"], r["speed"], r["pitch"]) for r in rows}) > 1  # voices vary across captions


def test_a_second_run_reuses_every_clip_and_a_new_seed_changes_voices(espeak, coco_subset, tmp_path):
    out = tmp_path / "spoken"
    speak(f"coco:{coco_subset}", "--out", str(out), "--max-groups", "2", "--format", "wav")
    clips = {p: p.stat().st_mtime_ns for p in (out / "audio").iterdir()}
    first = (out / "manifest.jsonl").read_text()
    speak(f"coco:{coco_subset}", "--out", str(out), "--max-groups", "2", "--format", "wav")
    assert {p: p.stat().st_mtime_ns for p in (out / "audio").iterdir()} == clips  # nothing re-synthesised
    assert (out / "manifest.jsonl").read_text() == first
    speak(f"coco:{coco_subset}", "--out", str(out), "--max-groups", "2", "--format", "wav", "--seed", "1")
    assert (out / "manifest.jsonl").read_text() != first


def test_explicit_voice_speed_and_pitch_are_used(espeak, coco_subset, tmp_path):
    speak(f"coco:{coco_subset}", "--out", str(tmp_path), "--max-groups", "1", "--voices", "en-gb-scotland+f5", "--speeds", "165", "--pitches", "45")
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert {(r["voice"], r["speed"], r["pitch"]) for r in rows} == {("en-gb-scotland+f5", 165, 45)}


def test_voice_draws_are_deterministic_and_cover_the_pool():
    picks = [TRAIN_POOL.pick(f"0|img{i}|caption {i}") for i in range(2000)]
    assert picks == [TRAIN_POOL.pick(f"0|img{i}|caption {i}") for i in range(2000)]
    assert len(Counter(p.name for p in picks)) == len(TRAIN_POOL.voices)
    assert {p.speed for p in picks} == set(TRAIN_POOL.speeds) and {p.pitch for p in picks} == set(TRAIN_POOL.pitches)
    held = HELDOUT_POOL.pick("x")
    assert held.name not in TRAIN_POOL.voices and held.speed not in TRAIN_POOL.speeds
    assert VoicePool.parse("en-us,en-gb", variants=",m3").voices == ("en-us", "en-us+m3", "en-gb", "en-gb+m3")


def test_spoken_spec_synthesises_on_first_use_into_the_cache(espeak, coco_subset, _session_cache):
    report = DataReport()
    samples = read_dataset(f"spoken:coco:{coco_subset}", report)
    assert len(samples) == len(read_dataset(f"coco:{coco_subset}"))
    assert all(s.audio.startswith(str(_session_cache / "speech")) and s.image and s.text for s in samples)
    assert [s.audio for s in read_dataset(f"spoken:coco:{coco_subset}")] == [s.audio for s in samples]
    two = read_dataset(f"spoken:2:coco:{coco_subset}")
    assert len(two) == 2 * len(samples) and [s.audio for s in two[: len(samples)]] == [s.audio for s in samples]
    assert sum(a.audio != b.audio for a, b in zip(two[: len(samples)], two[len(samples) :])) > 0.9 * len(samples)
    assert [(s.group, s.text) for s in two[len(samples) :]] == [(s.group, s.text) for s in samples]
