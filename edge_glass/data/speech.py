"""Spoken captions with espeak-ng: image-caption samples -> image-audio-text triples.

    pool = VoicePool.parse("en-us+m3,en-gb+f2", speeds="150,175", pitches="40,60")
    triples = speak_samples(samples, out_dir, pool, fmt="mp3", seed=0, report=report)

Each caption is spoken once, by a voice (espeak-ng language + variant), speed (words per minute)
and pitch drawn from the pool by a seeded hash of the caption and its group, so the choice is
reproducible and independent of dataset order. Audio files are content-addressed (digest of the
text, voice, speed, pitch, format and espeak-ng version) under ``out_dir/audio/``: an existing
file is reused, so a second run synthesises nothing. espeak-ng writes 22.05 kHz mono WAV; other
formats (mp3, flac, ogg) are encoded with libsndfile.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import soundfile as sf

from ..errors import DataError
from ..paths import cache_root
from .formats import dataset_format, read_dataset
from .samples import DataReport, Sample

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}

# Training voices: six English accents x eleven variants, five speeds, three pitches.
TRAIN_VOICES = "en-us,en-gb,en-gb-x-rp,en-029,en-us-nyc,en-gb-x-gbcwmd"
TRAIN_VARIANTS = ",m1,m2,m3,m4,m6,f1,f2,f4,klatt,klatt3,edward"
TRAIN_SPEEDS, TRAIN_PITCHES = "130,150,175,190,210", "35,50,65"
# Held out: an accent, a variant and a speed that training never uses.
HELDOUT_VOICES, HELDOUT_SPEEDS, HELDOUT_PITCHES = "en-gb-scotland+f5", "165", "45"


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice, optionally +variant: "en-us", "en-gb+f2"
    speed: int  # words per minute
    pitch: int  # 0..99

    def args(self) -> list[str]:
        return ["-v", self.name, "-s", str(self.speed), "-p", str(self.pitch)]


@dataclass(frozen=True)
class VoicePool:
    voices: tuple[str, ...]
    speeds: tuple[int, ...]
    pitches: tuple[int, ...]

    @staticmethod
    def parse(voices: str, speeds: str = "175", pitches: str = "50", variants: str = "") -> "VoicePool":
        """Comma-separated lists; ``variants`` (e.g. ",m3,f2": "" = the voice's own) multiplies the voices."""
        names = [v.strip() for v in voices.split(",") if v.strip()]
        if variants:
            names = [f"{n}+{v.strip()}" if v.strip() else n for n in names for v in variants.split(",")]
        try:
            pool = VoicePool(tuple(names), tuple(int(s) for s in speeds.split(",")), tuple(int(p) for p in pitches.split(",")))
        except ValueError:
            raise DataError(f"voice pool: speeds {speeds!r} and pitches {pitches!r} must be comma-separated integers") from None
        if not pool.voices:
            raise DataError("voice pool: no voices given")
        return pool

    def pick(self, key: str) -> Voice:
        """The voice of one caption: a deterministic draw from the pool by ``key``."""
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:12], "big")
        h, v = divmod(h, len(self.voices))
        h, s = divmod(h, len(self.speeds))
        return Voice(self.voices[v], self.speeds[s], self.pitches[h % len(self.pitches)])


TRAIN_POOL = VoicePool.parse(TRAIN_VOICES, TRAIN_SPEEDS, TRAIN_PITCHES, TRAIN_VARIANTS)
HELDOUT_POOL = VoicePool.parse(HELDOUT_VOICES, HELDOUT_SPEEDS, HELDOUT_PITCHES)


@lru_cache(maxsize=1)
def espeak_version() -> str:
    """The installed espeak-ng's version line; DataError with an install hint if it is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng; scripts/setup.sh does it)")
    return subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def synthesize(text: str, voice: Voice, fmt: str = "wav") -> bytes:
    """Speak ``text`` -> encoded audio bytes in ``fmt`` (espeak-ng's 22.05 kHz mono). Even WAV is
    rewritten: espeak-ng's streamed header carries a placeholder data size."""
    espeak_version()
    proc = subprocess.run(["espeak-ng", *voice.args(), "--stdout", text], capture_output=True)
    if proc.returncode or len(proc.stdout) <= 44:
        raise DataError(f"espeak-ng failed on {text[:40]!r} with {voice}: {proc.stderr.decode(errors='replace').strip() or 'no audio'}")
    samples, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=FORMATS[fmt][0], subtype=FORMATS[fmt][1])
    return buf.getvalue()


def clip_name(text: str, voice: Voice, fmt: str) -> str:
    key = "\n".join([espeak_version(), voice.name, str(voice.speed), str(voice.pitch), fmt, text])
    return hashlib.sha1(key.encode()).hexdigest() + "." + fmt


def _write_clip(path: Path, text: str, voice: Voice, fmt: str) -> None:
    if path.is_file():
        return
    data = synthesize(text, voice, fmt)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def speak_clips(jobs: list[tuple[str, Voice]], out_dir: Path, fmt: str = "flac", workers: int = 2) -> list[Path]:
    """(text, voice) pairs -> their clips under out_dir/audio/ (content-addressed: a clip that
    exists is reused, and equal pairs share one file), in the order given."""
    if fmt not in FORMATS:
        raise DataError(f"speak: format {fmt!r} is not one of {', '.join(FORMATS)}")
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    paths = [audio_dir / clip_name(text, voice, fmt) for text, voice in jobs]
    todo = {path: job for path, job in zip(paths, jobs)}
    with ThreadPoolExecutor(max(1, workers)) as ex:  # espeak-ng runs as a subprocess: threads overlap
        list(ex.map(lambda item: _write_clip(item[0], item[1][0], item[1][1], fmt), todo.items()))
    return paths


def speak_samples(samples: list[Sample], out_dir: Path, pool: VoicePool, fmt: str = "mp3", seed: int = 0,
                  report: DataReport | None = None, workers: int = 2) -> list[tuple[Sample, Voice]]:
    """Samples with text -> the same samples with ``audio`` = a spoken file under out_dir/audio/,
    paired with the voice that spoke it. Samples without text are skipped (reported)."""
    if fmt not in FORMATS:
        raise DataError(f"speak: format {fmt!r} is not one of {', '.join(FORMATS)}")
    spoken: list[tuple[Sample, Voice]] = []
    for s in samples:
        if not s.text:
            if report is not None:
                report.skip(s.source, "no caption to speak")
            continue
        spoken.append((s, pool.pick(f"{seed}|{s.group}|{s.text}")))
    paths = speak_clips([(s.text, voice) for s, voice in spoken], out_dir, fmt, workers)
    return [(replace(s, audio=str(path)), voice) for (s, voice), path in zip(spoken, paths)]


@dataset_format("spoken", over_spec=True)
def read_spoken(inner: str, report: DataReport) -> list[Sample]:
    """``spoken:SPEC`` or ``spoken:K:SPEC``: SPEC's samples with each caption spoken by K voices
    (default 1) drawn from the training pool with seeds 0..K-1, synthesised on first use into
    <cache root>/speech/ (FLAC: lossless, and fast to write). All clips of an image share its group."""
    count, sep, rest = inner.partition(":")
    voices, inner = (int(count), rest) if sep and count.isdigit() else (1, inner)
    if voices < 1:
        raise DataError(f"spoken:{count}:...: the number of voices per caption must be at least 1")
    samples = read_dataset(inner, report)
    return [s for seed in range(voices) for s, _ in speak_samples(samples, cache_root() / "speech", TRAIN_POOL, "flac", seed, report)]


def write_manifest(spoken: list[tuple[Sample, Voice]], out_dir: Path, name: str = "manifest.jsonl") -> Path:
    """A tri-modal JSONL manifest of spoken samples (jsonl:FILE reads it): ``image`` (absolute
    path, when the image is a file), ``audio`` (relative to the manifest), ``text``, ``group``,
    and the voice that spoke it."""
    out_dir = Path(out_dir).resolve()
    lines = []
    for s, voice in spoken:
        row = {"image": str(Path(s.image).resolve())} if isinstance(s.image, str) else {}
        row.update(audio=str(Path(s.audio).resolve().relative_to(out_dir)), text=s.text, group=s.group,
                   voice=voice.name, speed=voice.speed, pitch=voice.pitch)
        lines.append(json.dumps(row))
    path = out_dir / name
    tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
