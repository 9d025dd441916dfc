"""Standard model formats other tools load, written from a loaded run (``edge_glass.load``).

    export_sentence_transformer(model, DIR, dim=None)   an alignment run's text tower as a
                                                        sentence-transformers model directory
    save_pretrained(model, DIR) / from_pretrained(DIR)  any run as a Hugging Face style directory:
                                                        config.json, model.safetensors, README.md card
    push_to_hub(model_or_DIR, repo_id)                  upload one to the Hugging Face Hub
    save_peft_adapter(vlm, DIR, merge=False)            a LoRA decoder as a PEFT adapter directory (or,
                                                        merged, a plain causal LM) + projector + prompts

Every export builds its folder beside the target and renames it into place (edge_glass.atomic):
a reader never sees half an export. The target may be missing, empty or an earlier Edge Glass
export (it holds ``edge_glass_export.json``), which is replaced; a folder holding anything else
is refused, never deleted.

Matryoshka dims in sentence-transformers: ST truncates (``truncate_dim``) *after* the model's
modules, so after its Normalize. The rows it returns at a truncated dim k are the first k
coordinates of a unit vector: the same direction and the same cosine scores as Edge Glass's
dim-k embedding, but with norm < 1. ``encode(texts, normalize_embeddings=True)`` (ST normalises
after truncating) gives Edge Glass's unit rows exactly; so does a directory exported with
``dim=k``, whose last Dense keeps only the first k outputs (then its plain ``encode`` and
``truncate_dim=k`` both give them).
"""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..atomic import atomic_dir, safetensors_bytes
from ..config import config_from_dict, dump_config
from ..decoders.lm import LMDecoder
from ..decoders.prompt import ChatPrompt, PlainPrompt, WordPrompt, WordTokenizer
from ..encoders import ENCODERS, FrozenEncoder
from ..errors import EdgeGlassError
from ..models.alignment import AlignedModel, ModalityHead
from ..models.vlm import AlignedVision, VisionLanguageModel
from ..runs import RunDir, read_safetensors
from ..tasks.alignment import build_core, build_run_encoders
from ..tasks.vlm import build_vlm, input_source, load_weights, vision_source

MARKER = "edge_glass_export.json"  # every export writes it; a folder holding it may be replaced
FORMAT = "edge_glass"  # config.json "format" of a save_pretrained directory
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
WORD_TOKENIZER = "word_tokenizer.json"
PROJECTOR = "projector.safetensors"
PROMPT = "vlm_prompt.json"

# Backbone licences, by a lower-case substring of the backbone's encoder type or model reference.
LICENCES: list[tuple[str, str]] = [
    ("all-minilm-l6-v2", "Apache-2.0"),
    ("efficientnet", "Apache-2.0"),  # EfficientNet-Lite (type efficientnet_lite, refs efficientnet-lite0/2)
    ("whisper", "MIT"),
    ("smollm2", "Apache-2.0"),
]
UNKNOWN_LICENCE = "see the backbone's model card"


# --- shared helpers ------------------------------------------------------------------------------

def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edge-glass")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "unknown"


def _is_export(path: Path) -> bool:
    return (path / MARKER).is_file()


def _check_target(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` if an export may be written there: missing, empty, or an earlier export."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise EdgeGlassError(f"{out}: exists and is not a directory; choose a new or empty directory to export into")
        if any(out.iterdir()) and not _is_export(out):
            raise EdgeGlassError(f"{out}: exists and holds files that are not an Edge Glass export "
                                 f"(no {MARKER}); choose a new or empty directory to export into")
    return out


@contextmanager
def _export_dir(out_dir: str | os.PathLike, fmt: str, model: Any, extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """A temporary folder to fill; on success it becomes ``out_dir`` (with the marker file)."""
    out = _check_target(out_dir)
    with atomic_dir(out) as tmp:
        yield tmp
        info = {"format": fmt, "edge_glass_version": _version(), "source_run": _source(model),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        (tmp / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")


def _source(model: Any) -> str | None:
    run_dir = getattr(model, "run_dir", None)
    return str(run_dir) if run_dir is not None else getattr(model, "pretrained_from", None)


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.write_bytes(safetensors_bytes(state, {"format": "pt"}))


def _config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data, exactly as the run's config.yaml holds it."""
    return yaml.safe_load(dump_config(cfg))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _task_of(model: Any) -> str:
    if isinstance(model, AlignedModel):
        return "alignment"
    if isinstance(model, VisionLanguageModel):
        return "vlm"
    raise EdgeGlassError(f"expected a loaded run (edge_glass.load: an AlignedModel or a VisionLanguageModel), got {type(model).__name__}")


# --- 1. the text tower as a sentence-transformers model ------------------------------------------

def _text_tower(model: Any) -> tuple[Any, str]:
    """(the sentence_transformer text encoder, its head's pooler type), or an error saying why not."""
    if not isinstance(model, AlignedModel):
        raise EdgeGlassError(f"export to sentence-transformers: needs an alignment run (edge_glass.load), got {type(model).__name__}")
    if "text" not in model.encoders:
        raise EdgeGlassError(f"export to sentence-transformers: this run has no text encoder (encoders: {', '.join(model.encoders)})")
    kind = model.cfg.encoders["text"].type
    if kind != "sentence_transformer":
        raise EdgeGlassError(f"encoders.text: type {kind!r} cannot be exported to sentence-transformers "
                             "(only a sentence_transformer text encoder is a sentence-transformers model)")
    pooler = model.cfg.model.heads["text"].pooler.type
    if pooler not in ("mean", "pooled"):
        raise EdgeGlassError(f"model.heads.text.pooler: type {pooler!r} has no sentence-transformers module "
                             "(the mean and pooled poolers export; attention and perceiver poolers do not)")
    return model.encoders["text"], pooler


def _dense_layers(projection: nn.Module, dim: int) -> list[Any]:
    """The Matryoshka projection (Linear, or Linear-GELU-Linear; dropout is off at inference) as
    sentence-transformers Dense modules; the last keeps its first ``dim`` outputs."""
    from sentence_transformers.sentence_transformer.modules import Dense

    layers = [m for m in projection.net if not isinstance(m, nn.Dropout)]
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Linear):
            continue
        act = layers[i + 1] if i < last else None
        if act is not None and not isinstance(act, nn.GELU):
            raise EdgeGlassError(f"projection: {type(act).__name__} activation has no sentence-transformers export")
        w = layer.weight.detach().cpu().clone()
        b = layer.bias.detach().cpu().clone() if layer.bias is not None else None
        if i == last:
            w, b = w[:dim].clone(), (b[:dim].clone() if b is not None else None)
        out.append(Dense(w.shape[1], w.shape[0], bias=b is not None, activation_function=copy.deepcopy(act) if act is not None else None,
                         init_weight=w, init_bias=b))
    return out


def export_sentence_transformer(model: AlignedModel, out_dir: str | os.PathLike, dim: int | None = None) -> Path:
    """Write the text tower of an alignment run (a ``sentence_transformer`` text encoder, a
    ``mean`` or ``pooled`` text pooler) as a sentence-transformers directory:

        backbone Transformer -> Pooling(mean) [mean pooler] | the backbone's own modules [pooled]
        -> Dense (-> GELU Dense) [the Matryoshka projection] -> Normalize

    ``dim`` (default the largest trained dim) is the output width: the last Dense keeps the
    first ``dim`` projection outputs, so ``SentenceTransformer(DIR).encode(texts)`` and
    ``SentenceTransformer(DIR, truncate_dim=dim).encode(texts)`` equal
    ``model.encode_texts(texts, dim=dim)``. A smaller ``truncate_dim=k`` at load time needs
    ``encode(..., normalize_embeddings=True)`` to give the unit dim-k rows (module docstring).
    The encoder's max_length becomes the directory's max_seq_length."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    enc, pooler = _text_tower(model)
    dim = model.check_dim(dim)
    _check_target(out_dir)  # before the work
    backbone = SentenceTransformer(str(enc.model_dir), device="cpu")  # a copy: the run's own encoder is left as it is
    modules = list(backbone)
    if pooler == "mean":  # edge_glass's mean pooler: the masked mean of the backbone's token embeddings
        first_pool = next((i for i, m in enumerate(modules) if isinstance(m, Pooling)), len(modules))
        modules = modules[:first_pool] + [Pooling(enc.token_dim, pooling_mode="mean")]
    head = model.core.heads["text"]
    modules += _dense_layers(head.projection, dim) + [Normalize()]
    st = SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="cosine")
    st.max_seq_length = enc.cfg.max_length
    info = {"dim": dim, "trained_dims": model.dims, "pooler": pooler, "max_seq_length": enc.cfg.max_length, "backbone": enc.cfg.model,
            "truncation": "SentenceTransformer(DIR, truncate_dim=k).encode(texts, normalize_embeddings=True) gives Edge Glass's "
                          "dim-k embeddings for k < dim (ST truncates after Normalize)"}
    with _export_dir(out_dir, "sentence-transformers", model, info) as tmp:
        st.save(str(tmp), create_model_card=False)
        (tmp / "README.md").write_text(_sentence_transformer_card(model, enc, pooler, dim), encoding="utf-8")
    return Path(out_dir)


# --- 2. save_pretrained / from_pretrained ----------------------------------------------------------

def _vlm_state(core: nn.Module) -> dict[str, torch.Tensor]:
    """What a VLM directory stores: what training changed (core.trainable_state(); a LoRA run's
    frozen base LM comes from its reference) and the frozen aligned image head, if any."""
    state = core.trainable_state()
    state.update({k: v for k, v in core.state_dict().items() if k.startswith("vision.")})
    return state


def _aligned_config(model: VisionLanguageModel) -> dict[str, Any] | None:
    """The resolved config of the alignment run whose image head the VLM uses (None without one)."""
    ref = model.cfg.vision.aligned_run
    if not ref:
        return None
    saved = getattr(model, "aligned_config", None)  # a model from from_pretrained carries it
    if saved is not None:
        return saved
    return _config_dict(RunDir(ref).read_config())


def save_pretrained(model: Any, out_dir: str | os.PathLike) -> Path:
    """Write a loaded run (AlignedModel or VisionLanguageModel) as a Hugging Face style directory:

        config.json         {"format": "edge_glass", "task", "config": the resolved config, ...what rebuilds it}
        model.safetensors   the trained weights (frozen backbones come from their references, as in the run)
        README.md           model card: YAML front matter, backbones and licences, data, results, config
        word_tokenizer.json the word vocabulary of a tiny / trm decoder

    ``from_pretrained(DIR)`` rebuilds the model. A VLM on an alignment run's image head
    (vision.aligned_run) stores that head and its config too: the directory does not need the run."""
    task = _task_of(model)
    info: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "edge_glass_version": _version(), "library_name": "edge-glass",
                            "task": task, "architectures": [type(model).__name__], "config": _config_dict(model.cfg)}
    word_tokenizer: WordTokenizer | None = None
    if task == "alignment":
        info["dims"], info["modalities"] = model.dims, model.core.modalities
        fingerprints = getattr(model, "encoder_fingerprints", None)
        if fingerprints is None and model.run_dir is not None and RunDir(model.run_dir).file("encoders.json").is_file():
            fingerprints = RunDir(model.run_dir).read_json("encoders.json")
        info["encoders"] = fingerprints
        state = model.core.state_dict()
    else:
        if model.cfg.uses("audio") and model.cfg.audio.aligned_run:
            raise EdgeGlassError("save_pretrained: a decoder on an alignment run's audio head (audio.aligned_run) is not stored yet; "
                                 "load the run with edge_glass.load instead")
        info["majority_answer"] = model.majority
        info["aligned_vision"] = {"config": _aligned_config(model)} if model.cfg.vision.aligned_run else None
        prompt = getattr(model.core.decoder, "prompt", None)
        if isinstance(prompt, WordPrompt):  # tiny / trm decoders: the run's word vocabulary
            info["tokenizer"] = WORD_TOKENIZER
            word_tokenizer = prompt.tokenizer
        state = _vlm_state(model.core)
    info["weights"] = WEIGHTS
    card = model_card(model)
    with _export_dir(out_dir, "hf", model) as tmp:
        (tmp / "config.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        _write_safetensors(tmp / WEIGHTS, state)
        if word_tokenizer is not None:
            word_tokenizer.save(tmp / WORD_TOKENIZER)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(out_dir)


def read_pretrained_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a save_pretrained directory, checked; errors name the file and key."""
    f = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise EdgeGlassError(f"{path}: no such directory (expected a save_pretrained directory)")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeGlassError(f"{f}: missing; {path} is not a save_pretrained directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeGlassError(f"{f}: corrupt JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise EdgeGlassError(f"{f}: not an Edge Glass model (key 'format' is {info.get('format') if isinstance(info, dict) else None!r}, "
                             f"expected {FORMAT!r}); for a run directory use edge_glass.load")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise EdgeGlassError(f"{f}: format_version {info['format_version']} is newer than this Edge Glass reads ({FORMAT_VERSION}); upgrade edge-glass")
    if info.get("task") not in ("alignment", "vlm") or not isinstance(info.get("config"), dict):
        raise EdgeGlassError(f"{f}: key 'task' must be alignment or vlm and key 'config' a mapping")
    return info


def from_pretrained(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """A save_pretrained directory -> the model (AlignedModel or VisionLanguageModel) on
    ``device`` (default CUDA if available), embedding / answering as the saved one did."""
    path = Path(path)
    info = read_pretrained_config(path)
    device = _default_device() if device is None or str(device) == "auto" else torch.device(device)
    cfg = config_from_dict(info["config"], f"{path / 'config.json'}: config")
    weights = path / info.get("weights", WEIGHTS)
    state = read_safetensors(weights)
    if info["task"] == "alignment":
        encoders = build_run_encoders(cfg)
        core = build_core(cfg, encoders)
        missing, unexpected = core.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EdgeGlassError(f"{weights}: weights do not fit the model of config.json (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        saved = info.get("encoders") or {}
        for m, enc in encoders.items():
            if m in saved and isinstance(enc, FrozenEncoder) and saved[m].get("weights") != enc.weights_id():
                warnings.warn(f"{path}: the {m} backbone's weights differ from those the heads were trained on", stacklevel=2)
        model: nn.Module = AlignedModel(cfg, encoders, core, None)
        model.encoder_fingerprints = info.get("encoders")
    else:
        tokenizer = None
        if info.get("tokenizer"):
            tok_file = path / info["tokenizer"]
            try:
                tokenizer = WordTokenizer.load(tok_file)
            except (OSError, ValueError, KeyError) as exc:
                raise EdgeGlassError(f"{tok_file}: cannot read the word tokenizer ({exc})") from None
        aligned_cfg = (info.get("aligned_vision") or {}).get("config")
        if cfg.vision.aligned_run:
            if not isinstance(aligned_cfg, dict):
                raise EdgeGlassError(f"{path / 'config.json'}: key aligned_vision.config is missing (the config names vision.aligned_run)")
            acfg = config_from_dict(aligned_cfg, f"{path / 'config.json'}: aligned_vision.config")
            if "image" not in acfg.encoders:
                raise EdgeGlassError(f"{path / 'config.json'}: aligned_vision.config has no image encoder")
            encoder = ENCODERS.build(acfg.encoders["image"]).to(device)
            head = ModalityHead(acfg.model.heads["image"], encoder.token_dim, acfg.model.dims)
            vision = (encoder, AlignedVision(head, cfg.vision.aligned_output, cfg.vision.aligned_dim))
        else:
            vision = vision_source(cfg, device)
        audio = input_source(cfg, "audio", device) if cfg.uses("audio") else None
        core = build_vlm(cfg, tokenizer, vision, audio)
        expected = set(_vlm_state(core))
        if set(state) != expected:
            raise EdgeGlassError(f"{weights}: weights do not fit the model of config.json (missing {sorted(expected - set(state))[:5]}, "
                                 f"unexpected {sorted(set(state) - expected)[:5]})")
        load_weights(core, state, str(weights))
        model = VisionLanguageModel(cfg, vision[0], core, info.get("majority_answer"), None, audio[0] if audio else None)
        model.aligned_config = aligned_cfg
    model.pretrained_from = str(path)
    return model.to(device)


# --- the model card ------------------------------------------------------------------------------

def backbone_licence(kind: str, ref: str | None) -> str:
    text = f"{kind} {ref or ''}".lower()
    return next((lic for key, lic in LICENCES if key in text), UNKNOWN_LICENCE)


def backbones(model: Any) -> list[dict[str, str]]:
    """The pretrained parts a model is built on: role, type, model reference, licence."""
    cfg = model.cfg
    rows = []

    def add(role: str, enc_cfg: Any, note: str = "frozen") -> None:
        kind = enc_cfg.type
        ref = getattr(enc_cfg, "model", None) or getattr(enc_cfg, "tokenizer", None)
        if kind == "token_text":
            note = "trainable (trained in this run); tokenizer" + (" and initial token embeddings" if enc_cfg.init_embeddings else "") + f" from {ref}"
        rows.append({"role": role, "type": kind, "model": str(ref), "licence": backbone_licence(kind, ref), "note": note})

    if _task_of(model) == "alignment":
        for m, enc_cfg in cfg.encoders.items():
            add(f"{m} encoder", enc_cfg)
    else:
        aligned = _aligned_config(model)
        if aligned is not None:
            acfg = config_from_dict(aligned, "aligned_vision.config")
            add("image encoder", acfg.encoders["image"], f"frozen, with the frozen image head of alignment run {cfg.vision.aligned_run}")
        else:
            add("image encoder", cfg.vision.encoder)
        d = cfg.decoder
        if d.type == "lm":
            note = (f"frozen, LoRA r={d.lora_r} adapters trained" if d.lora_r > 0 else "frozen") + (f", loaded {d.quantization}" if d.quantization != "none" else "")
            rows.append({"role": "decoder", "type": "lm", "model": d.model, "licence": backbone_licence("lm", d.model), "note": note})
    return rows


def _licence_field(rows: list[dict[str, str]]) -> str:
    known = {r["licence"] for r in rows}
    if len(known) == 1 and UNKNOWN_LICENCE not in known:
        return known.pop().lower()
    return "other"


def _front_matter(fields: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def _run_results(run_dir: Any) -> list[tuple[str, dict[str, Any]]]:
    """(title, metrics) of the run's eval.json (its test split) and eval_<dataset>.json files."""
    if run_dir is None:
        return []
    out = []
    files = sorted(Path(run_dir).glob("eval*.json"), key=lambda p: (p.name != "eval.json", p.name))
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and ("dims" in data or "exact_match" in data):
            out.append(("test split" if f.name == "eval.json" else f"extra evaluation set `{f.stem[5:]}`", data))
    return out


def _results_markdown(run_dir: Any) -> list[str]:
    lines: list[str] = []
    for title, r in _run_results(run_dir):
        lines.append(f"### {title}\n")
        if "dims" in r:
            counts = ", ".join(f"{v} {k[2:]}" for k, v in r.items() if k.startswith("n_"))
            lines.append(f"Retrieval Recall@K (%) per Matryoshka dim and direction ({counts}):\n")
            ks = list(dict.fromkeys(k for block in r["dims"].values() for d in block.values() for k in d))
            lines.append("| dim | direction | " + " | ".join(ks) + " |")
            lines.append("|---|---|" + "---|" * len(ks))
            for dim, block in r["dims"].items():
                for direction, vals in block.items():
                    lines.append(f"| {dim} | {direction} | " + " | ".join(f"{vals.get(k, float('nan')):.2f}" for k in ks) + " |")
            if "digits" in r:
                z = r["digits"]
                lines.append(f"\nSpoken digits, closed set: {z['accuracy']:.2f}% of {z['n']} clips (chance {z['chance']:.0f}%)")
        else:
            lines.append("| metric | value |\n|---|---|")
            lines.append(f"| exact match (%) | {r['exact_match']:.2f} |")
            lines.append(f"| token F1 (%) | {r.get('f1', float('nan')):.2f} |")
            lines.append(f"| questions | {r.get('n', '?')} |")
            if "majority_answer" in r:
                lines.append(f"| majority answer {r['majority_answer']!r}, exact match (%) | {r['majority_exact_match']:.2f} |")
        lines.append("")
    return lines or ["No evaluation results were recorded with this model (the run directory had no eval.json).", ""]


def _data_markdown(cfg: Any) -> list[str]:
    d = cfg.data
    lines = ["Training data (dataset specs):", ""] + [f"- `{s}`" for s in d.train]
    if d.eval:
        lines += ["", "Extra evaluation sets:", ""] + [f"- `{s}`" for s in d.eval]
    if cfg.task == "alignment":
        lines += ["", f"Held out per dataset (by image / clip, seed {d.split.seed}): val {d.split.val:g}, test {d.split.test:g}"
                  + (f"; at most {d.max_groups} groups per dataset" if d.max_groups else "")]
    else:
        lines += ["", f"Held out unless the data defines its splits (by image, seed {d.seed}): val {d.val:g}, test {d.test:g}"
                  + (f"; at most {d.max_samples} samples per dataset and split" if d.max_samples else "")]
    return lines + [""]


def _backbones_markdown(rows: list[dict[str, str]], included: bool = False) -> list[str]:
    lines = ["| role | type | model | licence | |", "|---|---|---|---|---|"]
    lines += [f"| {r['role']} | {r['type']} | `{r['model']}` | {r['licence']} | {r['note']} |" for r in rows]
    note = ("The backbone's weights are included in this directory and keep their own licence." if included else
            "The trained weights here are only part of the model: the frozen backbones are loaded from their "
            "references and keep their own licences.")
    return lines + ["", note, ""]


def _and(words: list[str]) -> str:
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def model_card(model: Any) -> str:
    """README.md of a save_pretrained directory."""
    task = _task_of(model)
    cfg = model.cfg
    rows = backbones(model)
    if task == "alignment":
        mods = model.core.modalities
        tags = ["edge-glass", "matryoshka", "multimodal", "embeddings", *[f"{m}-embeddings" for m in mods]]
        pipeline = "feature-extraction"
        summary = (f"An Edge Glass alignment model: frozen {_and(list(cfg.encoders))} encoders with trained heads that embed "
                   f"{_and(mods)} into one shared space of Matryoshka dims {model.dims} (unit vectors; any prefix "
                   "of the largest embedding, renormalised, is an embedding too).")
        usage = ["```python", "import edge_glass", "", "model = edge_glass.from_pretrained(\"DIR\")"]
        if "image" in mods:
            usage.append(f"img = model.encode_images([\"photo.jpg\"], dim={model.dims[-1]})")
        if "text" in mods:
            usage.append(f"txt = model.encode_texts([\"a dog on a beach\"], dim={model.dims[-1]})")
        usage.append("```")
    else:
        lora = cfg.decoder.type == "lm" and cfg.decoder.lora_r > 0
        tags = ["edge-glass", "vision-language", "visual-question-answering", *(["lora", "peft"] if lora else []), f"decoder-{cfg.decoder.type}"]
        pipeline = "visual-question-answering"
        summary = (f"An Edge Glass vision-language model: frozen visual tokens -> trained projector -> {cfg.decoder.type} decoder "
                   f"({cfg.fusion.type} fusion) answering questions about images.")
        usage = ["```python", "import edge_glass", "", "vlm = edge_glass.from_pretrained(\"DIR\")",
                 "vlm.answer([\"photo.jpg\"], [\"what is in the image?\"])", "```"]
    front = {"library_name": "edge-glass", "license": _licence_field(rows), "tags": tags, "pipeline_tag": pipeline}
    if front["license"] == "other":  # the backbones table names each licence
        front["license_name"] = "unknown" if any(r["licence"] == UNKNOWN_LICENCE for r in rows) else "mixed"
    lines = [_front_matter(front), f"# {cfg.name}", "", summary, "", "## Usage", "", *usage, "",
             "Needs `pip install edge-glass` and the backbones below (their references resolve through "
             "`edge_glass.weights.resolve`).", "", "## Backbones", "", *_backbones_markdown(rows),
             "## Data", "", *_data_markdown(cfg), "## Results", "", *_results_markdown(model.run_dir),
             "## Config", "", "The resolved experiment config (also in config.json):", "", "```yaml", dump_config(cfg).rstrip(), "```", "",
             f"Written by Edge Glass {_version()}" + (f" from run `{model.run_dir}`." if model.run_dir is not None else "."), ""]
    return "\n".join(lines)


def _sentence_transformer_card(model: AlignedModel, enc: Any, pooler: str, dim: int) -> str:
    rows = [r for r in backbones(model) if r["role"] == "text encoder"]
    other = [m for m in model.core.modalities if m != "text"]
    front = {"library_name": "sentence-transformers", "license": _licence_field(rows),
             "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "edge-glass", "matryoshka"],
             "pipeline_tag": "sentence-similarity"}
    smaller = [d for d in model.dims if d < dim]
    lines = [_front_matter(front), f"# {model.cfg.name}: text tower", "",
             f"The text tower of the Edge Glass alignment model `{model.cfg.name}`: `{enc.cfg.model}` "
             f"({'mean of its token embeddings' if pooler == 'mean' else 'its own sentence embedding'}) followed by the "
             f"trained Matryoshka projection, giving unit {dim}-d embeddings in the space shared with the model's "
             f"{_and(other) or 'other'} embeddings. Texts are cut at {enc.cfg.max_length} tokens.", "",
             "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             "model = SentenceTransformer(\"DIR\")", "emb = model.encode([\"a dog on a beach\"])   # unit rows, "
             f"= edge_glass encode_texts(..., dim={dim})", "```", ""]
    if smaller:
        k = smaller[-1]
        lines += [f"Smaller Matryoshka dims (trained: {model.dims}): truncate and renormalise,", "", "```python",
                  f"model = SentenceTransformer(\"DIR\", truncate_dim={k})",
                  "emb = model.encode(texts, normalize_embeddings=True)",
                  "```", "", "sentence-transformers truncates after the model's Normalize module, so without "
                  "`normalize_embeddings=True` the truncated rows have the right direction (and cosine scores) but norm < 1.", ""]
    lines += ["## Backbone", "", *_backbones_markdown(rows, included=True), "## Data", "", *_data_markdown(model.cfg),
              "## Results", "", "Of the whole alignment model this tower belongs to:", "", *_results_markdown(model.run_dir), f"Written by Edge Glass {_version()}"
              + (f" from run `{model.run_dir}`." if model.run_dir is not None else "."), ""]
    return "\n".join(lines)


# --- push to the Hub -----------------------------------------------------------------------------

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _probe(endpoint: str, timeout: float) -> None:
    """One HTTP request to the Hub with a deadline (huggingface_hub's own client has none)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/whoami-v2", method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the Hub answered (401 without a token, say): it is reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise EdgeGlassError(f"push_to_hub: cannot reach the Hugging Face Hub at {endpoint} within {timeout:g} s ({reason}); "
                             "check the network, or HF_ENDPOINT") from None


def push_to_hub(source: Any, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str | None = None, endpoint: str | None = None, timeout: float = 10.0) -> str:
    """Upload a loaded run (written with save_pretrained first) or an exported directory
    (save_pretrained, export_sentence_transformer, save_peft_adapter) to the Hub repo
    ``repo_id`` (created if missing) with huggingface_hub's upload_folder. Fails fast with an
    EdgeGlassError when the Hub is switched off (HF_HUB_OFFLINE) or does not answer within
    ``timeout`` seconds. Returns the commit URL."""
    if _hub_offline():
        raise EdgeGlassError(f"push_to_hub {repo_id}: the Hugging Face Hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE "
                             "is set); unset it to upload")
    from huggingface_hub import HfApi, constants

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if folder is not None and not folder.is_dir():
        raise EdgeGlassError(f"{folder}: no such directory to upload")
    _probe(endpoint, timeout)
    errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        import httpx2

        errors += (httpx2.HTTPError,)
    except ImportError:
        pass
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edge_glass_push_") as tmp:
        if folder is None:
            folder = save_pretrained(source, Path(tmp) / "model")
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or "Upload with Edge Glass")
        except errors as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise EdgeGlassError(f"push_to_hub {repo_id} ({endpoint}): {reason}") from None
    return str(getattr(info, "commit_url", info))


# --- 3. LoRA decoders as PEFT adapters -----------------------------------------------------------

def _lora_decoder(model: Any) -> LMDecoder:
    if not isinstance(model, VisionLanguageModel):
        raise EdgeGlassError(f"PEFT export: needs a vlm run (edge_glass.load), got {type(model).__name__}")
    decoder = model.core.decoder
    if not isinstance(decoder, LMDecoder):
        raise EdgeGlassError(f"decoder.type: {model.cfg.decoder.type!r} has no LoRA adapters to export as PEFT "
                             "(only decoder type lm with lora_r > 0 has)")
    if decoder.cfg.lora_r <= 0 or not hasattr(decoder.lm, "peft_config"):
        raise EdgeGlassError("decoder.lora_r: 0, so the LM has no LoRA adapters to export (it is the frozen base model)")
    return decoder


def _prompt_info(model: VisionLanguageModel, decoder: LMDecoder, merged: bool) -> dict[str, Any]:
    cfg = model.cfg
    prompt = decoder.prompt
    example = "what is in the image?"
    style: dict[str, Any]
    if isinstance(prompt, ChatPrompt):
        style = {"style": "chat", "system_prompt": prompt.system, "end_of_answer_token": prompt.end_token,
                 "how": "the tokenizer's chat template: one user turn (the question), add_generation_prompt=True, rendered as text "
                        "then tokenized with add_special_tokens=False; the answer is the assistant turn, ended by end_of_answer_token",
                 "example_text": prompt.render(example)}
    elif isinstance(prompt, PlainPrompt):
        style = {"style": "plain", "template": prompt.template,
                 "how": "template.format(question=...) tokenized with the tokenizer's special tokens; the answer is ' ' + answer + EOS",
                 "example_text": prompt.template.format(question=example)}
    else:
        style = {"style": type(prompt).__name__}
    projector = model.core.projector
    return {
        "format": "edge_glass.vlm_prompt", "version": 1,
        "base_model": cfg.decoder.model, "merged": merged, "lora": {"r": cfg.decoder.lora_r, "alpha": cfg.decoder.lora_alpha},
        "prompt": {**style, "example_question": example, "example_ids": prompt.prompt_ids(example), "eos_id": prompt.eos_id, "pad_id": prompt.pad_id},
        "sequence": ("inputs_embeds = concat([projector(visual tokens) (B, P, hidden_size), embed_tokens(prompt ids) (B, L, hidden_size)], dim=1); "
                     "prompts left-padded; attention_mask covers the real visual and text positions; position_ids = index among the "
                     "row's real positions (cumsum(mask) - 1); greedy decoding of up to max_new_tokens until eos_id"),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "fusion": cfg.fusion.model_dump(mode="json"),
        "fusion_note": None if cfg.fusion.type in ("prefix", "none") else
        f"fusion {cfg.fusion.type!r} hooks extra layers (fusion.* in {PROJECTOR}) into the LM's blocks (edge_glass.decoders.fusion); "
        "the LM directory alone does not reproduce it",
        "vision": {"encoder": cfg.vision.encoder.model_dump(mode="json") if not cfg.vision.aligned_run else None,
                   "aligned_run": cfg.vision.aligned_run, "aligned_output": cfg.vision.aligned_output, "aligned_dim": cfg.vision.aligned_dim,
                   "aligned_config": _aligned_config(model)},
        "projector": None if projector is None else {
            "file": PROJECTOR, "config": cfg.projector.model_dump(mode="json"),
            "in_dim": projector.net[0].normalized_shape[0], "out_dim": decoder.d_model,
            "layers": "projector.net: 0 LayerNorm(in_dim), 1 Dropout, then 2 Linear(in_dim, hidden), 3 GELU, 4 Linear(hidden, out_dim) "
                      "(hidden set) or 2 Linear(in_dim, out_dim); tokens pooled first (pool: mean = masked mean, k = k x k average grid)"},
    }


def save_peft_adapter(model: VisionLanguageModel, out_dir: str | os.PathLike, merge: bool = False) -> Path:
    """Write a LoRA vlm run's decoder for tools outside Edge Glass:

        merge=False  adapter_config.json + adapter_model.safetensors: peft.PeftModel.from_pretrained(base, DIR)
        merge=True   a causal LM with the adapters merged in: AutoModelForCausalLM.from_pretrained(DIR)

    both with the tokenizer, projector.safetensors (projector.*, and fusion.* / vision.* weights if
    the run has them, named as in the VLM) and vlm_prompt.json (how prompts and the visual prefix
    are built). The live model is not changed (merging works on a copy)."""
    decoder = _lora_decoder(model)
    _check_target(out_dir)
    if merge and decoder.cfg.quantization != "none":
        raise EdgeGlassError(f"decoder.quantization: {decoder.cfg.quantization!r}: adapters cannot be merged exactly into a quantized "
                             "base; export the adapter (merge=False) instead")
    side = {k: v for k, v in model.core.state_dict().items() if k.startswith(("projector.", "fusion.", "vision."))}
    info = _prompt_info(model, decoder, merge)
    with _export_dir(out_dir, "peft-merged" if merge else "peft", model, {"base_model": decoder.cfg.model}) as tmp:
        if merge:
            lm = copy.deepcopy(decoder.lm).merge_and_unload()
            lm.save_pretrained(str(tmp))
            del lm
        else:
            decoder.lm.save_pretrained(str(tmp))
        decoder.tokenizer.save_pretrained(str(tmp))
        if side:
            _write_safetensors(tmp / PROJECTOR, side)
        (tmp / PROMPT).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return Path(out_dir)
