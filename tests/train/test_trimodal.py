"""A tiny tri-modal run through the real CLI: spoken COCO captions (image-audio-text), Asterisk
prompts (audio-text, with broken files mixed in) and FSDD digits (audio-text, official test
takes), a concat fusion of image + audio; then evaluation on FSDD and on an mp3 manifest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from edge_glass.cli import main
from edge_glass.data.fsdd import parse_recording

BAD = {  # file -> the reason the data report must give
    "empty.wav": "empty file",
    "truncated.wav": "truncated",
    "noise.ogg": "cannot decode",
    "silent.wav": "no audio samples after decoding",
    "nan.wav": "audio contains NaN or infinite samples",
    "missing.flac": "audio file not found",
}


def write_bad_files(folder: Path, good: Path) -> None:
    (folder / "empty.wav").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "noise.ogg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    sf.write(folder / "silent.wav", np.zeros(0, np.float32), 16000)
    x = np.full(1600, 0.1, np.float32)
    x[7] = np.nan
    sf.write(folder / "nan.wav", x, 16000, subtype="FLOAT")


@pytest.fixture(scope="module")
def run_dir(espeak, coco_subset, fsdd_subset, data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("trimodal")
    assert main(["speak", f"coco:{coco_subset}", "--out", str(root / "spoken"), "--max-groups", "10", "--format", "wav"]) == 0
    prompts = [json.loads(line) for line in (data_root / "asterisk" / "transcripts.jsonl").read_text().splitlines()][:24]
    write_bad_files(root, data_root / "asterisk" / prompts[0]["audio"])
    lines = [{"audio": str(data_root / "asterisk" / p["audio"]), "text": p["text"]} for p in prompts]
    lines += [{"audio": name, "text": f"a broken prompt {i}"} for i, name in enumerate(BAD)]
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cfg = {
        "name": "tri",
        "encoders": {"image": {"type": "efficientnet_lite"}, "audio": {"type": "whisper", "batch_size": 8},
                     "text": {"type": "sentence_transformer"}},
        "model": {"dims": [32, 16], "heads": {"audio": {"pooler": {"type": "perceiver", "dim": 32, "latents": 8, "depth": 1, "heads": 4}}},
                  "fusion": {"type": "concat", "dim": 32, "hidden": 64}},
        "data": {"train": [f"jsonl:{root / 'spoken' / 'manifest.jsonl'}", f"jsonl:{root / 'prompts.jsonl'}", f"fsdd:{fsdd_subset}"],
                 "split": {"val": 2, "test": 4}},
        "train": {"epochs": 2, "batch_size": 16, "log_every": 5, "threads": 1},
    }
    (root / "tri.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "edge_glass.cli", "train", str(root / "tri.yaml"), "--out", str(root / "run"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_every_broken_audio_file_is_skipped_counted_and_named(run_dir):
    report = json.loads((run_dir / "data_report.json").read_text())
    by_file = {Path(s["input"]).name: s["reason"] for s in report["skipped"]}
    assert set(by_file) == set(BAD)
    for name, reason in BAD.items():
        assert by_file[name].startswith(reason), (name, by_file[name])
    assert report["skipped_count"] == len(BAD)
    prompts = next(k for k in report["read"] if k.endswith("prompts.jsonl"))
    assert report["read"][prompts] == 24 + len(BAD) and report["kept"][prompts] == 24


def test_the_official_fsdd_test_takes_are_the_test_split(run_dir, fsdd_subset):
    split = json.loads((run_dir / "split.json").read_text())[f"fsdd:{fsdd_subset}"]
    assert sorted(split["test"]) == sorted(f"{d}_{s}_{t}.wav" for d in range(10) for s in ("george", "jackson") for t in (0, 1))
    assert len(split["val"]) == 2 and all(parse_recording(g).take >= 5 for g in split["val"])


def test_test_split_metrics_cover_every_pair_and_the_fused_query(run_dir):
    m = json.loads((run_dir / "eval.json").read_text())
    blocks = ["image_to_text", "text_to_image", "audio_to_text", "text_to_audio", "image_to_audio", "audio_to_image",
              "image+audio_to_text", "text_to_image+audio"]
    for name in blocks:
        assert set(m[name]) == {"R@1", "R@5", "R@10"} and all(0 <= v <= 100 for v in m[name].values()), name
    assert set(m["dims"]) == {"32", "16"} and set(m["dims"]["16"]) == set(blocks)
    prompts = next(v for k, v in json.loads((run_dir / "split.json").read_text()).items() if k.endswith("prompts.jsonl"))
    good_prompts = sum(1 for g in prompts["test"] if Path(g).name not in BAD)
    assert m["n_images"] == 4 and m["n_image+audio"] >= 4 * 5  # every caption of a test image is spoken once
    assert m["n_audio"] == m["n_image+audio"] + good_prompts + 40  # + test prompts + the 40 FSDD test takes
    assert m["n_texts"] == m["n_image+audio"] + good_prompts + 10  # FSDD's clips share the ten digit words


def test_eval_on_fsdd_adds_closed_set_digit_accuracy_per_speaker(run_dir, fsdd_subset, tmp_path):
    assert main(["eval", str(run_dir), "--data", f"fsdd:{fsdd_subset}", "--json", str(tmp_path / "f.json"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "f.json").read_text())
    z = m["digits"]
    assert z["n"] == 40 and z["chance"] == 10.0 and set(z["per_speaker"]) == {"george", "jackson"}
    assert set(z["dims"]) == {"32", "16"} and z["accuracy"] == z["dims"]["32"]["accuracy"]
    assert z["accuracy"] == pytest.approx(sum(z["per_speaker"].values()) / 2)  # 20 clips per speaker
    assert m["n_audio"] == 40 and m["n_texts"] == 10
    assert z["accuracy"] == m["audio_to_text"]["R@1"]  # ten digit words: the same decision as retrieval


def test_eval_on_a_spoken_mp3_manifest_with_an_unseen_voice(run_dir, coco_subset, tmp_path):
    assert main(["speak", f"coco:{coco_subset}", "--out", str(tmp_path), "--max-groups", "3", "--voices", "en-gb-scotland+f5", "--speeds", "165"]) == 0
    assert main(["eval", str(run_dir), "--data", f"jsonl:{tmp_path / 'manifest.jsonl'}", "--json", str(tmp_path / "m.json"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"audio_to_text", "text_to_audio", "image_to_audio", "audio_to_image", "image+audio_to_text"} <= set(m)
    assert m["n_images"] == 3 and m["n_audio"] == m["n_texts"] and m["skipped"] == 0


def test_python_api_embeds_audio_and_image_audio_pairs(run_dir, data_root):
    import edge_glass

    model = edge_glass.load(run_dir)
    path = data_root / "fsdd" / "recordings" / "3_theo_10.wav"
    z = model.encode_audio([str(path), path.read_bytes()], dim=16)
    assert z.shape == (2, 16)
    torch.testing.assert_close(z[0], z[1])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    image = sorted((data_root / "coco1k" / "images").iterdir())[0]
    fused = model.encode_fused([str(image), str(image)], [str(path), str(data_root / "fsdd" / "recordings" / "4_theo_10.wav")])
    assert fused.shape == (2, 32) and not torch.allclose(fused[0], fused[1])  # the clip changes the joint query
