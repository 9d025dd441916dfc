"""The vlm task: answer questions about images and audio with a decoder on frozen tokens.

Data: QA specs (edge_glass/data/qa.py) read and split per dataset (a dataset's own splits
honoured, e.g. easy-VQA's test set or vqa_yesno's dev/test; the rest hashed by image, and an
image one dataset holds out is held out by the hashed datasets too), images encoded once into
the feature cache. Vision: a frozen backbone, or an alignment run's frozen encoder + image head
(``vision.aligned_run``). Audio (``audio:``), the same way: a frozen Whisper encoder or an
alignment run's audio encoder + head (``audio.aligned_run``), clips cached like images. A sample
has an image, audio or both (batches mix them); ``drop: [image | audio | question]`` removes an
input for ablations. Loss: next-token cross-entropy on the answer tokens only. Evaluation:
answers generated token by token (never teacher-forced), exact match and token F1 (word error
rate on transcripts), the majority-answer baseline, how many distinct answers the model gives,
and sample predictions.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.qa import SPLIT_NAMES, qa_splits, read_qa, split_group
from ..data.samples import DataReport
from ..data.vqa import QASample
from ..decoders import DECODERS
from ..decoders.fusion import DECODER_FUSIONS
from ..decoders.prompt import WordTokenizer, collate
from ..encoders import ENCODERS
from ..errors import EdgeGlassError
from ..eval.qa import qa_metrics, word_error_rate
from ..features.cache import feature_cache_dir
from ..features.qa import QAData, build_qa_data
from ..models.vlm import STREAMS, VLM, AlignedHead, Projector, VisionLanguageModel
from ..runs import RunDir
from ..tensors import to_device
from .alignment import AlignmentTask
from .base import Task, count_parameters, register_task

WORD_DECODERS = ("tiny", "trm")  # decoders trained from scratch on a word-level vocabulary


# --- model ---------------------------------------------------------------------------------------

def input_source(cfg: Any, modality: str, device: torch.device | str = "cpu"):
    """(frozen encoder, aligned head or None) of a vlm config's image or audio input, on ``device``."""
    section = cfg.vision if modality == "image" else cfg.audio
    key = "vision" if modality == "image" else "audio"
    if section.aligned_run:
        aligned = AlignmentTask.load_run(RunDir(section.aligned_run), device)
        if modality not in aligned.encoders:
            raise EdgeGlassError(f"{key}.aligned_run: {section.aligned_run} has no {modality} encoder (it has {', '.join(aligned.encoders)})")
        return aligned.encoders[modality], AlignedHead(aligned.core.heads[modality], section.aligned_output, section.aligned_dim, key)
    return ENCODERS.build(section.encoder).to(device), None


def vision_source(cfg: Any, device: torch.device | str = "cpu"):
    """(frozen image encoder, aligned head or None) of a vlm config, on ``device``."""
    return input_source(cfg, "image", device)


def data_modalities(cfg: Any) -> list[str]:
    """The inputs a vlm config reads from its samples: the image unless dropped (read even for
    fusion none, so that every ablation variant sees the same samples) and the audio when the
    config has an audio section."""
    return [m for m in STREAMS if m not in cfg.drop and (m == "image" or cfg.audio is not None)]


def build_vlm(cfg: Any, tokenizer: WordTokenizer | None, vision: tuple | None, audio: tuple | None = None) -> VLM:
    """The trainable model of a vlm config; ``vision`` = input_source(cfg, "image"), ``audio`` =
    input_source(cfg, "audio") (each may be None when the config does not use it)."""
    decoder = DECODERS.build(cfg.decoder, tokenizer) if cfg.decoder.type in WORD_DECODERS else DECODERS.build(cfg.decoder)
    streams = [m for m in STREAMS if cfg.uses(m)]
    fusion = DECODER_FUSIONS.build(cfg.fusion, decoder.d_model, len(decoder.blocks()), streams=max(1, len(streams)))
    projectors: dict[str, Projector | None] = {"image": None, "audio": None}
    heads: dict[str, AlignedHead | None] = {"image": None, "audio": None}
    for m, source, pcfg in (("image", vision, cfg.projector), ("audio", audio, cfg.audio_projector)):
        if m not in streams:
            continue
        if source is None:
            raise EdgeGlassError(f"build_vlm: the config uses the {m} input but no {m} encoder was given")
        encoder, heads[m] = source
        in_dim = heads[m].out_dim if heads[m] is not None else encoder.token_dim
        projectors[m] = Projector(pcfg, in_dim, decoder.d_model, temporal=m == "audio")
    return VLM(decoder, fusion, projectors["image"], heads["image"], projectors["audio"], heads["audio"])


def load_weights(core: VLM, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a run's trainable state; everything missing must be frozen (a LoRA run's base LM)."""
    missing, unexpected = core.load_state_dict(state, strict=False)
    frozen = {n for n, p in core.named_parameters(remove_duplicate=False) if not p.requires_grad} | {n for n, _ in core.named_buffers()}  # tied weights under every name
    if unexpected or set(missing) - frozen:
        raise EdgeGlassError(f"{where}: weights do not fit the model (missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")


# --- data ----------------------------------------------------------------------------------------

def first_per_split(samples: list[QASample], n: int | None) -> list[QASample]:
    """The first n samples of each split the dataset defines (data.max_samples)."""
    if n is None:
        return samples
    out, count = [], Counter()
    for s in samples:
        count[s.split] += 1
        if count[s.split] <= n:
            out.append(s)
    return out


def split_per_dataset(parts: dict[str, list[QASample]], val: float, test: float, seed: int) -> dict[str, list[str]]:
    """{spec: split of each of its samples}. Each dataset is split on its own (its given splits
    honoured, the rest hashed by image); then, in a dataset that gives no val/test split of its
    own, a training sample whose image another dataset holds out follows it there (test before
    val), so no held-out image is trained on through a second dataset (captions of a VQA test
    photo, say). Datasets with their own splits keep them as they are."""
    where = {spec: qa_splits(samples, val, test, seed) for spec, samples in parts.items()}
    held: dict[str, str] = {}
    for spec, samples in parts.items():
        for s, w in zip(samples, where[spec]):
            if w == "test" or (w == "val" and s.key not in held):
                held[s.key] = w
    for spec, samples in parts.items():
        hashed = not any(SPLIT_NAMES.get(s.split) for s in samples)  # the dataset gives no val/test of its own
        if hashed and len(parts) > 1:
            where[spec] = [held.get(s.key, w) if w == "train" else w for s, w in zip(samples, where[spec])]
    return where


def decoder_questions(cfg: Any, questions: list[str]) -> list[str]:
    """The text questions the decoder gets: none (empty prompts) when the config drops them."""
    return [""] * len(questions) if "question" in cfg.drop else questions


def _sample_record(s: QASample, drop: Sequence[str] = ()) -> dict[str, Any]:
    """A prediction record: the sample, and ``given``: the inputs the decoder got once the run's
    ``drop`` is applied (a record may name an audio file the decoder never heard)."""
    given = [m for m, v in (("image", s.image), ("audio", s.audio), ("question", s.question)) if v and m not in drop]
    return {"image": s.image, **({"audio": s.audio} if s.audio is not None else {}), "question": s.question, "answer": s.answer,
            "given": given}


def qa_results(core: VLM, data: QAData, batch_size: int, max_new_tokens: int, samples: int, majority: str | None,
               details: dict[str, Any] | None = None, drop: Sequence[str] = ()) -> dict[str, Any]:
    """EM / F1 of generated answers; word error rate over the transcript samples; per-kind and
    per-input breakdowns when the data mixes them. ``drop``: the run's dropped inputs (with
    "question" the decoder gets empty prompts). ``details`` (a dict) receives every sample's
    prediction under "predictions", each with "halt_steps" (supervision steps per generated
    token) for a TRM decoder."""
    preds: list[str] = []
    halt: list[list[int]] = []
    trace = details is not None and hasattr(core.decoder, "step_trace")
    for s in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(s, min(s + batch_size, len(data))))
        questions = [""] * len(batch.questions) if "question" in drop else batch.questions
        if trace:
            core.decoder.step_trace = []
        try:
            preds += core.answer(batch.features, questions, max_new_tokens, batch.present)
            if trace:
                halt += torch.stack(core.decoder.step_trace, 1).tolist() if core.decoder.step_trace else [[] for _ in batch.questions]
        finally:
            if trace:
                core.decoder.step_trace = None
    refs = [s.answer for s in data.samples]
    if details is not None:
        details["predictions"] = [{**_sample_record(s, drop), "prediction": p, "source": s.source, **({"halt_steps": h} if trace else {})}
                                  for s, p, h in zip(data.samples, preds, halt or [None] * len(preds))]
    result: dict[str, Any] = qa_metrics(preds, refs)
    result["distinct_answers"] = len(set(preds))
    transcripts = [i for i, s in enumerate(data.samples) if s.kind == "transcript"]
    if transcripts:
        w = word_error_rate([preds[i] for i in transcripts], [refs[i] for i in transcripts])
        result.update(wer=w["wer"], words=w["words"], wer_n=w["n"])
    for key, group in (("by_kind", lambda s: s.kind), ("by_input", lambda s: "+".join(s.modalities()) or "text")):
        groups: dict[str, list[int]] = {}
        for i, smp in enumerate(data.samples):
            groups.setdefault(group(smp), []).append(i)
        if len(groups) > 1:
            result[key] = {g: qa_metrics([preds[i] for i in idx], [refs[i] for i in idx]) for g, idx in groups.items()}
    if majority is not None:
        result["majority_answer"] = majority
        result["majority_exact_match"] = qa_metrics([majority] * len(refs), refs)["exact_match"]
    result["predictions"] = [{**_sample_record(s, drop), "prediction": p} for s, p in zip(data.samples[:samples], preds[:samples])]
    return result


def format_qa(result: dict[str, Any], title: str) -> str:
    wer = f"   WER {result['wer']:.2f} ({result['words']} words)" if "wer" in result else ""
    lines = [title, f"exact match {result['exact_match']:.2f}   F1 {result['f1']:.2f}{wer}   n {result['n']}   distinct answers {result['distinct_answers']}"]
    for key in ("by_kind", "by_input"):
        for g, r in result.get(key, {}).items():
            lines.append(f"  {g:<16} exact match {r['exact_match']:.2f}   F1 {r['f1']:.2f}   n {r['n']}")
    if "majority_answer" in result:
        lines.append(f"majority answer {result['majority_answer']!r}: exact match {result['majority_exact_match']:.2f}")
    for p in result.get("predictions", [])[:5]:
        given = p.get("given", ["question"])
        heard = "" if "audio" not in given else " (heard)" if "question" in given else " (heard, text not given)"
        lines.append(f"  Q{heard}: {p['question']}  A: {p['answer']}  predicted: {p['prediction']}")
    return "\n".join(lines)


def compare_qa(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'variant':<24}{'EM':>8}{'F1':>8}{'distinct':>10}{'trainable':>12}"]
    for name, r in results.items():
        if r:
            lines.append(f"{name:<24}{r['exact_match']:>8.2f}{r['f1']:>8.2f}{r['distinct_answers']:>10}{r.get('trainable_parameters', 0):>12,}")
    return "\n".join(lines)


@register_task
class VLMTask(Task):
    name = "vlm"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.tokenizer: WordTokenizer | None = None
        self.majority: str | None = None
        self._sources: dict[str, tuple] = {}

    def source(self, modality: str) -> tuple | None:
        """(frozen encoder, aligned head or None) of an input the config reads, else None."""
        if modality not in data_modalities(self.cfg):
            return None
        if modality not in self._sources:
            self._sources[modality] = input_source(self.cfg, modality, self.device)
        return self._sources[modality]

    @property
    def vision(self) -> tuple | None:
        return self.source("image")

    def encoders(self) -> dict[str, Any]:
        return {m: self.source(m)[0] for m in data_modalities(self.cfg)}

    @classmethod
    def find_unused_parameters(cls, cfg: Any) -> bool:
        return cfg.decoder.type == "lm"  # LoRA-frozen parts and the unused lm_head rows

    # -- training
    def load(self, report, progress: bool) -> dict[str, Any]:
        cfg = self.cfg
        encoders = self.encoders()
        parts = {spec: first_per_split(read_qa(spec, report), cfg.data.max_samples) for spec in cfg.data.train}
        extra = {spec: first_per_split(read_qa(spec, report), cfg.data.max_samples) for spec in cfg.data.eval}
        where = split_per_dataset(parts, cfg.data.val, cfg.data.test, cfg.data.seed)
        everything = [s for p in parts.values() for s in p] + [s for p in extra.values() for s in p]
        if cfg.audio is None and any(s.audio is not None for s in everything):
            warnings.warn("the data has audio (spoken questions or speech) but the config has no audio section: the decoder will not hear it", stacklevel=2)
        data = build_qa_data(everything, encoders, report, feature_cache_dir(cfg), cfg.cache.dtype, progress)
        split_of = {id(s): w for spec, p in parts.items() for s, w in zip(p, where[spec])}
        spec_of = {id(s): spec for spec, p in parts.items() for s in p}

        def members(keep) -> QAData:
            return data.select([i for i, s in enumerate(data.samples) if keep(s)])

        out = {name: members(lambda s, n=name: split_of.get(id(s)) == n) for name in ("train", "val", "test")}
        for spec, p in extra.items():
            ids = {id(s) for s in p}
            out[f"eval:{spec}"] = members(lambda s, ids=ids: id(s) in ids)
        answers = Counter(s.answer for s in out["train"].samples)
        self.majority = answers.most_common(1)[0][0] if answers else None
        if cfg.decoder.type in WORD_DECODERS:
            self.tokenizer = WordTokenizer.build(t for s in out["train"].samples for t in (s.question, s.answer))
        split_record = {spec: {name: sorted({split_group(s) for s in out[name].samples if spec_of[id(s)] == spec}) for name in ("val", "test")}
                        for spec in parts}
        self.records = {"split.json": split_record, "encoders.json": {m: e.fingerprint() for m, e in encoders.items()},
                        "qa.json": {"majority_answer": self.majority}}
        for name, d in out.items():
            report.kept[name] += len(d)
        return out

    def build(self) -> nn.Module:
        return build_vlm(self.cfg, self.tokenizer, self.source("image"), self.source("audio"))

    def loss(self, model: nn.Module, core: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        prompt = core.decoder.prompt
        questions = decoder_questions(self.cfg, batch.questions)
        enc = collate([prompt.encode(q, a) for q, a in zip(questions, batch.answers)], prompt.pad_id)
        device = core.device
        feats, present = to_device(batch.features, device), to_device(batch.present, device)
        out = model(feats, enc["input_ids"].to(device), enc["attention_mask"].to(device), enc["labels"].to(device), present)
        return out.loss, out.metrics

    def evaluate(self, core: nn.Module, data: Any, limit: int | None = None) -> dict[str, Any]:
        if limit is not None and len(data) > limit:
            data = data.select(list(range(limit)))
        e = self.cfg.eval
        result = qa_results(core, data, e.batch_size, e.max_new_tokens, e.samples, self.majority, drop=self.cfg.drop)
        result["trainable_parameters"] = sum(p.numel() for p in core.parameters() if p.requires_grad)
        return result

    def score(self, result: dict[str, Any]) -> float:
        return result["exact_match"] + result["f1"]

    def state_to_save(self, core: nn.Module) -> dict[str, torch.Tensor]:
        return core.trainable_state()

    def save_files(self, run) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(run.file("tokenizer.json"))

    # -- a trained run
    @classmethod
    def load_run(cls, run: RunDir, device: torch.device | str = "cpu") -> VisionLanguageModel:
        cfg = run.read_config()
        tok_file = run.file("tokenizer.json")
        tokenizer = WordTokenizer.load(tok_file) if tok_file.exists() else None
        sources = {m: input_source(cfg, m, device) for m in data_modalities(cfg)}
        core = build_vlm(cfg, tokenizer, sources.get("image"), sources.get("audio"))
        load_weights(core, run.load_weights(), str(run.file("model.safetensors")))
        majority = run.read_json("qa.json").get("majority_answer") if run.file("qa.json").exists() else None
        encoder, audio = (sources[m][0] if m in sources else None for m in STREAMS)
        return VisionLanguageModel(cfg, encoder, core, majority, run.path, audio).to(device)

    def evaluate_run(self, model: VisionLanguageModel, spec: str | None, report, progress: bool = True,
                     details: dict[str, Any] | None = None) -> dict[str, Any]:
        """EM / F1 on a QA spec (its own test split when it names one), or on the run's own test
        split (split.json) without one. ``details`` (a dict) receives every sample's prediction
        (see qa_results)."""
        cfg = model.cfg
        if spec:
            samples = read_qa(spec, report)
            samples = [s for s in samples if SPLIT_NAMES.get(s.split or "") == "test"] or samples
        else:
            record = RunDir(model.run_dir).read_json("split.json")
            samples = []
            for sp in cfg.data.train:
                test = set(record["test"] if isinstance(record.get("test"), list) else record.get(sp, {}).get("test", []))  # runs before 0.2: one list
                samples += [s for s in first_per_split(read_qa(sp, report), cfg.data.max_samples) if split_group(s) in test]
            if not samples:
                raise EdgeGlassError(f"{model.run_dir}: its test split is empty; pass --data")
        encoders = {m: e for m, e in (("image", model.encoder), ("audio", model.audio_encoder)) if e is not None}
        data = build_qa_data(samples, encoders, report, feature_cache_dir(cfg), cfg.cache.dtype, progress)
        e = cfg.eval
        return qa_results(model.core, data, e.batch_size, e.max_new_tokens, e.samples, model.majority, details, cfg.drop)

    def parameter_rows(self, run_dir=None) -> list[tuple[str, int, int]]:
        cfg = self.cfg
        if cfg.decoder.type in WORD_DECODERS:  # the vocabulary comes from the training questions
            self.tokenizer = WordTokenizer.load(Path(run_dir) / "tokenizer.json") if run_dir else WordTokenizer.build(
                t for spec in cfg.data.train for s in read_qa(spec, DataReport()) for t in (s.question, s.answer))
        core = self.build()
        rows = []
        for m, key, projector in (("image", "vision", "projector"), ("audio", "audio", "audio_projector")):
            if (source := self.source(m)) is None:
                continue
            encoder, aligned = source
            rows.append(count_parameters(f"{key}.encoder ({encoder.cfg.type}, frozen)", encoder.ensure_loaded()))
            if aligned is not None:
                rows.append(count_parameters(f"{key}.aligned_head (frozen)", aligned))
            if getattr(core, projector) is not None:
                rows.append(count_parameters(projector, getattr(core, projector)))
        if core.modality_embedding is not None:
            rows.append(("modality embeddings", core.modality_embedding.numel(), core.modality_embedding.numel()))
        return rows + [count_parameters(f"fusion ({cfg.fusion.type})", core.fusion), count_parameters(f"decoder ({cfg.decoder.type})", core.decoder)]

    # -- results
    def table(self, result: dict[str, Any], title: str) -> str:
        return format_qa(result, title)

    def compare(self, results: dict[str, dict[str, Any]]) -> str:
        return compare_qa(results)
