"""What the data pipeline passes around: samples with any subset of modalities, and the report
of everything skipped (nothing bad is dropped silently)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json

MODALITIES = ("image", "audio", "text")


@dataclass(frozen=True)
class Sample:
    """One training/eval example. image/audio: a path (str) or encoded bytes; text: a string.

    group: the unit of splitting (no group is in two splits), usually the image or clip identity.
    source: where the sample came from, for messages ("captions.json annotation 42").
    split: a split the dataset itself assigns ("train", "val" or "test", e.g. FSDD's official
    test takes), honoured before the seeded hash split; None = decided by the hash.
    """

    group: str
    source: str
    image: Any = None
    audio: Any = None
    text: str | None = None
    split: str | None = None

    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)


@dataclass
class Skipped:
    source: str
    reason: str
    input: str = ""


@dataclass
class DataReport:
    """Counts of samples read and kept, and every skipped one with its reason."""

    read: Counter = field(default_factory=Counter)  # dataset -> samples read
    kept: Counter = field(default_factory=Counter)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, source: str, reason: str, input: str = "") -> None:
        self.skipped.append(Skipped(source, reason, input))

    def reasons(self) -> Counter:
        return Counter(s.reason.split(" (")[0] for s in self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": dict(self.read),
            "kept": dict(self.kept),
            "skipped_count": len(self.skipped),
            "skipped_by_reason": dict(self.reasons()),
            "skipped": [s.__dict__ for s in self.skipped],
        }

    def summary(self) -> str:
        if not self.skipped:
            return f"data: {sum(self.kept.values())} samples, none skipped"
        reasons = ", ".join(f"{n} {r}" for r, n in self.reasons().most_common())
        return f"data: {sum(self.kept.values())} samples kept, {len(self.skipped)} skipped ({reasons})"

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())
