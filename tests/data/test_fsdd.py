"""FSDD reader and predefined splits: digit words as texts, the official test takes kept as the
test split (for training and for evaluation), the rest split by the seeded hash."""
from __future__ import annotations

import os

import pytest

from edge_glass.data.formats import read_dataset
from edge_glass.data.fsdd import DIGIT_WORDS, parse_recording
from edge_glass.data.samples import DataReport, Sample
from edge_glass.data.split import sample_splits
from edge_glass.errors import DataError
from edge_glass.tasks.alignment import evaluation_samples


def test_reader_gives_digit_words_groups_per_file_and_the_official_test_takes(fsdd_subset, tmp_path):
    report = DataReport()
    samples = read_dataset(f"fsdd:{fsdd_subset}", report)
    assert len(samples) == 80 and not report.skipped
    assert {s.text for s in samples} == set(DIGIT_WORDS)
    for s in samples:
        rec = parse_recording(s.group)
        assert s.text == DIGIT_WORDS[rec.digit] and s.audio.endswith(s.group)
        assert s.split == ("test" if rec.take < 5 else None)
    # the recordings folder itself is accepted too, and any prefix covers every digit
    assert [s.group for s in read_dataset(f"fsdd:{fsdd_subset / 'recordings'}")] == [s.group for s in samples]
    assert {s.text for s in samples[:10]} == set(DIGIT_WORDS)


def test_badly_named_recordings_are_skipped_and_named(fsdd_subset, tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    for f in list((fsdd_subset / "recordings").iterdir())[:3]:
        os.symlink(f.resolve(), folder / f.name)
    (folder / "hello_world.wav").write_bytes(b"")
    report = DataReport()
    assert len(read_dataset(f"fsdd:{tmp_path}", report)) == 3
    assert [(s.input.endswith("hello_world.wav"), s.reason) for s in report.skipped] == [(True, "file name is not {digit}_{speaker}_{take}.wav")]


def test_a_predefined_test_split_is_kept_and_only_val_is_hashed(fsdd_subset):
    samples = read_dataset(f"fsdd:{fsdd_subset}")
    parts = sample_splits(samples, val=8, test=0.3, seed=0)
    official = {s.group for s in samples if parse_recording(s.group).take < 5}
    assert parts["test"] == official  # no hashed test groups on top of FSDD's own
    assert len(parts["val"]) == 8 and not parts["val"] & official
    assert parts["train"] == {s.group for s in samples} - official - parts["val"]
    assert sample_splits(samples, val=8, test=0.3, seed=1)["val"] != parts["val"]


def test_datasets_without_predefined_splits_are_hashed_as_before():
    samples = [Sample(group=f"g{i}", source="", audio="a", text="t") for i in range(20)]
    parts = sample_splits(samples, val=2, test=5, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [13, 2, 5]


def test_conflicting_or_unknown_splits_are_errors():
    with pytest.raises(DataError, match="both"):
        sample_splits([Sample("g", "line 1", text="a", audio="x", split="test"), Sample("g", "line 2", text="b", audio="y", split="train")], 0, 0, 0)
    with pytest.raises(DataError, match="dev"):
        sample_splits([Sample("g", "line 1", text="a", audio="x", split="dev")], 0, 0, 0)


def test_evaluation_takes_a_datasets_own_test_split(fsdd_subset):
    samples = read_dataset(f"fsdd:{fsdd_subset}")
    held = evaluation_samples(samples)
    assert len(held) == 40 and all(parse_recording(s.group).take < 5 for s in held)
    plain = [Sample(group="g", source="", audio="a", text="t")]
    assert evaluation_samples(plain) == plain


def test_holdout_speaker_spec_puts_every_clip_of_that_speaker_in_test_and_none_of_the_others(fsdd_subset):
    from edge_glass.data.formats import read_dataset
    from edge_glass.data.fsdd import parse_recording
    from edge_glass.errors import DataError

    samples = read_dataset(f"fsdd-holdout:jackson:{fsdd_subset}")
    by = {(parse_recording(s.group).speaker, s.split) for s in samples}
    assert by == {("jackson", "test"), ("george", None)}  # george's official test takes are trainable here
    assert sum(s.split == "test" for s in samples) == 40
    with pytest.raises(DataError, match="no speaker 'nobody'"):
        read_dataset(f"fsdd-holdout:nobody:{fsdd_subset}")
