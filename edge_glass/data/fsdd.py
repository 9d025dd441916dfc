"""Free Spoken Digit Dataset readers.

    fsdd:DIR                   DIR = the dataset or its recordings/; official split (test = takes 0-4)
    fsdd-holdout:SPEAKER:DIR   every clip of SPEAKER is test, every clip of the others is train/val:
                               accuracy on a voice never heard in training

Recordings are ``{digit}_{speaker}_{take}.wav`` (8 kHz mono); each becomes an audio-text sample
whose text is the digit word ("zero" .. "nine") and whose group is the file name. Takes 0-4 are
FSDD's official test split (``Sample.split = "test"``, honoured by the splitter and by
evaluation); the other takes are left to the seeded split (train / val). Samples are ordered by
(take, speaker, digit), so any prefix of them covers the digits and speakers evenly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from ..errors import DataError
from ..paths import resolve_data_path
from .formats import dataset_format
from .samples import DataReport, Sample

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEST_TAKES = range(5)
_NAME = re.compile(r"^(\d)_([A-Za-z][A-Za-z0-9-]*)_(\d+)$")


class Recording(NamedTuple):
    digit: int
    speaker: str
    take: int


def parse_recording(name: str) -> Recording | None:
    """``"3_jackson_12.wav"`` (a file name or a group, with or without a dataset prefix) -> Recording."""
    m = _NAME.match(Path(name.rsplit("|", 1)[-1]).stem)
    return Recording(int(m[1]), m[2], int(m[3])) if m else None


def _recordings(root: Path, report: DataReport) -> list[tuple[Recording, Path]]:
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"fsdd:{root}: expected a directory of {{digit}}_{{speaker}}_{{take}}.wav recordings")
    found: list[tuple[Recording, Path]] = []
    for f in sorted(folder.glob("*.wav")):
        rec = parse_recording(f.name)
        if rec is None:
            report.skip(str(f), "file name is not {digit}_{speaker}_{take}.wav", str(f))
        else:
            found.append((rec, f))
    found.sort(key=lambda rf: (rf[0].take, rf[0].speaker, rf[0].digit))
    return found


def _sample(rec: Recording, f: Path, split: str | None) -> Sample:
    return Sample(group=f.name, source=str(f), audio=str(f), text=DIGIT_WORDS[rec.digit], split=split)


@dataset_format("fsdd")
def read_fsdd(root: Path, report: DataReport) -> list[Sample]:
    return [_sample(rec, f, "test" if rec.take in TEST_TAKES else None) for rec, f in _recordings(root, report)]


@dataset_format("fsdd-holdout", over_spec=True)
def read_fsdd_holdout(spec: str, report: DataReport) -> list[Sample]:
    speaker, sep, where = spec.partition(":")
    if not sep or not speaker or not where:
        raise DataError(f"fsdd-holdout:{spec}: expected fsdd-holdout:SPEAKER:DIR")
    root = resolve_data_path(where)
    found = _recordings(root, report)
    speakers = sorted({rec.speaker for rec, _ in found})
    if speaker not in speakers:
        raise DataError(f"fsdd-holdout:{spec}: no speaker {speaker!r} in {root} (speakers: {', '.join(speakers)})")
    return [_sample(rec, f, "test" if rec.speaker == speaker else None) for rec, f in found]
