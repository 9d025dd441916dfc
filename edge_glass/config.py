"""Typed, validated experiment configs: YAML in, errors that name the file and key path.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=3e-4", "model.dims=[256,64]"])

Every block is a pydantic model with ``extra="forbid"``; components (encoders, poolers) are
chosen by ``type`` from their registries, so a block is checked against the component it names.
``--set`` overrides are parsed as YAML values and validated like the file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .encoders import ENCODERS
from .errors import ConfigError
from .heads import FUSIONS, POOLERS, ProjectionConfig
from .heads.pooling import MeanConfig
from .decoders import DECODERS
from .decoders.fusion import DECODER_FUSIONS, PrefixConfig
from .encoders.efficientnet import EfficientNetLiteConfig
from .encoders.whisper import WhisperEncoderConfig
from .models.vlm import ProjectorConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --- data ----------------------------------------------------------------------------------------

class SplitConfig(Strict):
    """Held-out groups (images, or audio clips) per dataset: a count (int) or a fraction (< 1)."""

    val: float = Field(0.1, ge=0)
    test: float = Field(0.2, ge=0)
    seed: int = 0


class DataConfig(Strict):
    train: list[str] = Field(min_length=1, description="dataset specs: coco:DIR, flickr8k:DIR, jsonl:FILE, parquet:FILE")
    split: SplitConfig = SplitConfig()
    eval: list[str] = Field(default_factory=list, description="extra datasets evaluated whole at the end")
    max_groups: int | None = Field(None, ge=1, description="use only this many images/clips per dataset (quick runs)")
    pairs_per_epoch: Literal["all", "one_per_group"] = "all"
    weights: dict[str, float] = Field(default_factory=dict, description="per training dataset: its samples per epoch as a multiple of its size (0.25: a fresh quarter each epoch, 2: twice); default 1")

    @model_validator(mode="after")
    def _weights(self) -> "DataConfig":
        for spec, w in self.weights.items():
            if spec not in self.train:
                raise ValueError(f"weights: {spec!r} is not one of data.train")
            if w < 0:
                raise ValueError(f"weights: {spec!r} has a negative weight {w}")
        return self


class CacheConfig(Strict):
    enabled: bool = True
    dir: str | None = None  # default: $EDGE_GLASS_CACHE/features
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_size: int = Field(1024, ge=1)


# --- model and loss ------------------------------------------------------------------------------

class HeadConfig(Strict):
    pooler: POOLERS.config_union() = MeanConfig()  # type: ignore[valid-type]
    projection: ProjectionConfig = ProjectionConfig()


class ModelConfig(Strict):
    dims: list[int] = Field(default_factory=lambda: [512, 256, 128, 64], min_length=1)
    heads: dict[str, HeadConfig] = Field(default_factory=dict)
    fusion: FUSIONS.config_union() | None = Field(None, description="fuse two modalities' tokens into one embedding, e.g. image+audio")  # type: ignore[valid-type]

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v) or len(set(v)) != len(v):
            raise ValueError("dims must be distinct positive integers")
        return sorted(v, reverse=True)


class TemperatureConfig(Strict):
    init: float = Field(0.07, gt=0)
    learnable: bool = True
    min: float = Field(0.01, gt=0)
    max: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "TemperatureConfig":
        if not self.min <= self.init <= self.max:
            raise ValueError(f"need min <= init <= max, got {self.min} <= {self.init} <= {self.max}")
        return self


class MRLConfig(Strict):
    weights: list[float] | None = Field(None, description="one per dim (largest first); default uniform")
    sample_one_dim: bool = Field(False, description="each step trains one dim, drawn with probability ~ weight")


class LossConfig(Strict):
    temperature: TemperatureConfig = TemperatureConfig()
    mrl: MRLConfig = MRLConfig()
    pairs: list[str] | None = Field(None, description='modality pairs like "image-text"; default all pairs')
    pair_weights: dict[str, float] = Field(default_factory=dict)


# --- training and evaluation ---------------------------------------------------------------------

# Accelerate's tracker names (accelerate.utils.LoggerType without "all"; a test keeps them equal)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2, description="global batch (all processes together)")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: float = Field(0.05, ge=0, description="warmup steps (int) or fraction of all steps (< 1)")
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0, description="steps between validation evals; 0 = every epoch")
    select: Literal["last", "best"] = Field("last", description="final weights: the last step's, or the best validation score's")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process")
    log_with: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers through Accelerate (metrics.jsonl is always written): " + ", ".join(TRACKERS))
    project: str | None = Field(None, description="tracker project (W&B project, MLflow experiment, TensorBoard folder); default: the config's name")

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # log_with: wandb

    @field_validator("log_with")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` (as in --set train.mixed_precision=no) as false


class EvalConfig(Strict):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    batch_size: int = Field(512, ge=1)
    dims: list[int] | None = Field(None, description="dims to evaluate (prefix truncation); default model.dims")


class AlignmentConfig(Strict):
    """An alignment experiment: frozen encoders -> heads -> contrastive (MRL) loss."""

    task: Literal["alignment"] = "alignment"
    name: str = "experiment"
    seed: int = 0
    encoders: dict[str, ENCODERS.config_union()]  # type: ignore[valid-type]
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="ablation: name -> overrides")

    @model_validator(mode="after")
    def _consistent(self) -> "AlignmentConfig":
        for name, enc in self.encoders.items():
            modality = ENCODERS.get(enc.type).modality
            if name != modality:
                raise ValueError(f"encoders.{name}: encoder {enc.type!r} is a {modality} encoder; put it under encoders.{modality}")
        if len(self.encoders) < 2:
            raise ValueError("encoders: alignment needs at least two modalities")
        for name in self.encoders:
            self.model.heads.setdefault(name, HeadConfig())
        extra = set(self.model.heads) - set(self.encoders)
        if extra:
            raise ValueError(f"model.heads: no encoder for {sorted(extra)}")
        if self.eval.dims and max(self.eval.dims) > self.model.dims[0]:
            raise ValueError(f"eval.dims: {max(self.eval.dims)} exceeds the largest model dim {self.model.dims[0]}")
        w = self.loss.mrl.weights
        if w is not None and len(w) != len(self.model.dims):
            raise ValueError(f"loss.mrl.weights: {len(w)} weights for {len(self.model.dims)} dims")
        names = set(self.encoders)
        if (fusion := self.model.fusion) is not None:
            missing = [m for m in fusion.inputs if m not in self.encoders]
            if missing:
                raise ValueError(f"model.fusion.inputs: no encoder for {missing}")
            if not names - set(fusion.inputs):
                raise ValueError("model.fusion: needs a third modality to align the fused input with")
            names.add(fusion.name)
        for p in (self.loss.pairs or []) + list(self.loss.pair_weights):
            a, _, b = p.partition("-")
            if a not in names or b not in names or a == b or set(a.split("+")) & set(b.split("+")):
                raise ValueError(f"loss pair {p!r}: expected 'a-b' with a, b among {sorted(names)} (a fused input is not paired with its parts)")
        return self


# --- vision-language decoders ----------------------------------------------------------------

class InputConfig(Strict):
    """One input stream of a decoder: a frozen backbone (``encoder``), or an alignment run's
    frozen encoder + head of the same modality (``aligned_run``: the seeds' phase 1 -> 2)."""

    modality: ClassVar[str]
    aligned_run: str | None = Field(None, description="an alignment run dir: its frozen encoder + head of this modality make the tokens")
    aligned_output: Literal["auto", "latents", "embedding"] = Field(
        "auto", description="latents: a Perceiver head's latents (B, K, D); embedding: the Matryoshka embedding as one token; auto: latents if Perceiver")
    aligned_dim: int | None = Field(None, ge=1, description="Matryoshka dim of the embedding output (default: the largest)")

    @model_validator(mode="after")
    def _modality(self) -> "InputConfig":
        if ENCODERS.get(self.encoder.type).modality != self.modality:
            raise ValueError(f"encoder: {self.encoder.type!r} is not an {self.modality} encoder")
        return self


class VisionConfig(InputConfig):
    modality: ClassVar[str] = "image"
    encoder: ENCODERS.config_union() = Field(default_factory=EfficientNetLiteConfig)  # type: ignore[valid-type]


class AudioConfig(InputConfig):
    modality: ClassVar[str] = "audio"
    encoder: ENCODERS.config_union() = Field(default_factory=WhisperEncoderConfig)  # type: ignore[valid-type]


class QADataConfig(Strict):
    train: list[str] = Field(min_length=1, description="QA specs: easy-vqa[:train|:test], jsonl:FILE, captions:SPEC, "
                                                       "spoken-qa:SPEC, transcribe:SPEC, av-captions:SPEC")
    eval: list[str] = Field(default_factory=list, description="extra QA sets evaluated whole at the end")
    val: float = Field(0.05, ge=0, description="held-out images for validation (count or fraction) unless the data defines them")
    test: float = Field(0.1, ge=0, description="held-out images for testing unless the data defines them")
    seed: int = 0
    max_samples: int | None = Field(None, ge=1, description="first N samples per spec and predefined split (quick runs)")


class QAEvalConfig(Strict):
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(64, ge=1)
    samples: int = Field(20, ge=0, description="predictions saved with each evaluation")
    val_limit: int | None = Field(1000, ge=1, description="validation questions per periodic evaluation")


class VLMConfig(Strict):
    """A decoder experiment: frozen image (and audio) tokens -> projectors -> decoder, answer-only loss."""

    task: Literal["vlm"] = "vlm"
    name: str = "experiment"
    seed: int = 0
    vision: VisionConfig = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig()
    audio: AudioConfig | None = Field(None, description="an audio stream (spoken questions, speech); None: the decoder does not hear")
    audio_projector: ProjectorConfig = ProjectorConfig(pool=8)
    drop: list[Literal["image", "audio", "question"]] = Field(
        default_factory=list, description="inputs the decoder never gets (ablations): a dropped question is replaced by the empty prompt")
    decoder: DECODERS.config_union()  # type: ignore[valid-type]
    fusion: DECODER_FUSIONS.config_union() = PrefixConfig()  # type: ignore[valid-type]
    data: QADataConfig
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    eval: QAEvalConfig = QAEvalConfig()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="ablation: name -> overrides")

    @model_validator(mode="after")
    def _inputs(self) -> "VLMConfig":
        if "audio" not in self.drop and self.audio is None and self.fusion.type != "none" and "image" in self.drop:
            raise ValueError("drop: with the image dropped and no audio section the decoder has no input stream; use fusion: {type: none}")
        return self

    def uses(self, modality: str) -> bool:
        """Whether the model takes this input stream ("image" or "audio")."""
        if modality in self.drop or self.fusion.type == "none":
            return False
        return modality == "image" or (modality == "audio" and self.audio is not None)


# --- NL-MM: the nested-learning multimodal model -----------------------------------------------

class NLMMLevelConfig(Strict):
    """One continuum-memory level of the central memory: its own update period (OPTIMIZER STEPS:
    the level changes once every ``period`` steps, by the gradients summed since its last
    change), learning rate and optimizer."""

    name: str
    period: int = Field(1, ge=1, description="optimizer steps between this level's updates")
    lr: float = Field(1e-3, ge=0)
    hidden: int | None = Field(None, ge=1, description="MLP width; default 4 x d_model")
    optimizer: Literal["adamw", "adam", "sgd", "dmgd"] = "dmgd"
    optimizer_kwargs: dict[str, Any] = Field(default_factory=dict)


class NLMMTTTConfig(Strict):
    """Test-time training: a low-rank adapter on each encoder's tokens whose fast weight learns
    online (inner L2 reconstruction loss) over every sequence, in training and at inference."""

    enabled: bool = True
    rank: int = Field(16, ge=1)
    eta: float = Field(0.5, ge=0, description="inner learning rate; 0 turns adaptation off")
    mini_batch: int = Field(4, ge=1, description="tokens per inner gradient step")


class NLMMModelConfig(Strict):
    d_model: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    mixer: Literal["gated_delta", "delta", "linear", "softmax"] = Field(
        "gated_delta", description="token mixer of every block: a fast-weight rule, or softmax attention (ablation)")
    chunk_size: int = Field(64, ge=1, description="chunk length of the fast-weight chunked (WY) form")
    ffn_mult: int = Field(4, ge=1)
    depth: dict[Literal["text", "image", "audio"], int] = Field(default_factory=lambda: {"text": 2, "image": 2, "audio": 2})
    patch_size: int = Field(8, ge=1)
    audio_stride: Literal[1, 2, 4] = Field(4, description="log-mel frames per audio token (conv front end)")
    memory: Literal["latent", "concat"] = Field("latent", description="latent: L_mem slots read every modality by cross-attention; concat: no central memory, the decoders see the concatenated tokens")
    memory_slots: int = Field(16, ge=1)
    memory_rounds: int = Field(1, ge=1, description="read -> CMS -> broadcast rounds (the slots are broadcast back to the tokens between rounds)")
    cms: list[NLMMLevelConfig] | None = Field(
        default_factory=lambda: [NLMMLevelConfig(name="fast", period=1, lr=1e-3), NLMMLevelConfig(name="mid", period=4, lr=5e-4),
                                 NLMMLevelConfig(name="slow", period=16, lr=2e-4)],
        description="continuum-memory levels on the memory slots (fast -> slow); null: one plain MLP of the same width, trained with the rest")
    decoder_depth: int = Field(2, ge=1, description="causal blocks of the text decoder")
    recon_depth: int = Field(1, ge=1, description="cross-attention blocks of the image / audio reconstruction decoders")
    embed_dims: list[int] = Field(default_factory=lambda: [128, 32], min_length=1, description="Matryoshka dims of the retrieval embedding")
    ttt: NLMMTTTConfig = NLMMTTTConfig()
    gradient_checkpointing: bool = False
    plain: bool = Field(False, description="a plain transformer baseline: softmax mixers, no central memory, no CMS, no TTT (the model's other flags are ignored)")

    @field_validator("embed_dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v) or len(set(v)) != len(v):
            raise ValueError("embed_dims must be distinct positive integers")
        return sorted(v, reverse=True)

    @model_validator(mode="after")
    def _check(self) -> "NLMMModelConfig":
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if self.embed_dims[0] > self.d_model:
            raise ValueError(f"embed_dims: {self.embed_dims[0]} exceeds d_model {self.d_model}")
        names = [lv.name for lv in self.cms or []]
        if len(set(names)) != len(names):
            raise ValueError(f"cms: level names must be distinct, got {names}")
        return self


class NLMMDataConfig(Strict):
    train: list[str] = Field(min_length=1, description="dataset specs with any of image / audio / text: coco:DIR, spoken:coco:DIR, fsdd:DIR, jsonl:FILE, flickr8k:DIR...")
    split: SplitConfig = SplitConfig()
    eval: list[str] = Field(default_factory=list, description="extra datasets evaluated whole at the end")
    max_groups: int | None = Field(None, ge=1, description="use only this many images/clips per dataset (quick runs)")
    image_size: int = Field(64, ge=8, description="images resized to this square size")
    n_mels: int = Field(40, ge=8)
    max_audio_seconds: float = Field(6.0, gt=0)
    max_text_tokens: int = Field(32, ge=1)
    vocab_min_count: int = Field(2, ge=1, description="words seen fewer times in the training split are <unk>")
    max_vocab: int = Field(8000, ge=8, description="the most frequent words kept (the token embedding's size at most)")
    workers: int = Field(2, ge=1, description="decoding threads")


class NLMMLossConfig(Strict):
    """Loss weights (0 turns a term off) and the contrastive temperature."""

    text: float = Field(1.0, ge=0, description="caption / transcript language modelling, conditioned on the memory of the other modalities")
    image: float = Field(1.0, ge=0, description="patch reconstruction from the memory")
    audio: float = Field(1.0, ge=0, description="log-mel reconstruction from the memory")
    contrastive: float = Field(1.0, ge=0, description="InfoNCE between pooled per-modality memories (Matryoshka over embed_dims)")
    temperature: TemperatureConfig = TemperatureConfig()


class NLMMEvalConfig(Strict):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    samples: int = Field(20, ge=0, description="generated captions / transcripts saved with each evaluation")
    val_limit: int | None = Field(400, ge=1, description="validation samples per periodic evaluation")
    adapt: Literal["sequence", "none", "stream"] = Field(
        "sequence", description="test-time training at evaluation: sequence = online per sequence (as trained), none = eta 0, "
                                "stream = the adapter's state carried across the evaluated samples in order")


class NLMMConfig(Strict):
    """An NL-MM experiment: fast-weight encoders trained from raw media -> central latent memory
    with continuum-memory levels -> text / image / audio decoders and a contrastive embedding."""

    task: Literal["nlmm"] = "nlmm"
    name: str = "experiment"
    seed: int = 0
    model: NLMMModelConfig = NLMMModelConfig()
    loss: NLMMLossConfig = NLMMLossConfig()
    data: NLMMDataConfig
    train: TrainConfig = TrainConfig()
    ema: float | None = Field(0.999, gt=0, lt=1, description="decay of the EMA weights (evaluated and saved); null: none")
    eval: NLMMEvalConfig = NLMMEvalConfig()
    backbones: dict[str, ENCODERS.config_union()] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="modality -> a frozen pretrained encoder whose token features feed that NL-MM encoder in place of its "
                    "raw-media front end (encoded once, cached as for alignment); the other modalities train from raw media")
    cache: CacheConfig = CacheConfig()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="ablation: name -> overrides")

    @model_validator(mode="after")
    def _backbones(self) -> "NLMMConfig":
        from .encoders.base import FrozenEncoder

        for name, enc in self.backbones.items():
            cls = ENCODERS.get(enc.type)
            if name != cls.modality:
                raise ValueError(f"backbones.{name}: encoder {enc.type!r} is a {cls.modality} encoder; put it under backbones.{cls.modality}")
            if not issubclass(cls, FrozenEncoder):
                raise ValueError(f"backbones.{name}: {enc.type!r} is a trainable encoder; a backbone is a frozen pretrained one "
                                 f"(the NL-MM encoder itself is the trainable part)")
        return self


TASKS: dict[str, type[Strict]] = {"alignment": AlignmentConfig, "vlm": VLMConfig, "nlmm": NLMMConfig}


# --- loading, overrides, errors -----------------------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {value!r} ({exc})") from None


def apply_override(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _yaml_path(data: Any, loc: tuple) -> str:
    """Render a pydantic error location as the YAML key path (dropping union tags)."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # discriminated-union tag, not a key of the file
        if isinstance(node, dict) and part not in node and isinstance(part, str) and part in TASKS:
            continue
        out.append(str(part))
        node = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    return ".".join(out) or "(top level)"


def format_validation_error(exc: ValidationError, data: dict, source: str, overridden: set[str]) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        path = _yaml_path(data, err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        origin = " [from --set]" if any(path == k or path.startswith(k + ".") for k in overridden) else ""
        lines.append(f"  {path}: {msg}{origin}")
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<config>", overrides: list[str] | tuple[str, ...] = ()) -> Any:
    data = copy.deepcopy(data)
    keys = set()
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
        keys.add(key)
    task = data.get("task", "alignment")
    if task not in TASKS:
        raise ConfigError(f"{source}: task: unknown task {task!r}; known: {', '.join(TASKS)}")
    try:
        return TASKS[task].model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, source, keys)) from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    return config_from_dict(load_yaml(path), str(path), overrides)


def variant_config(cfg: Any, name: str) -> Any:
    """The config of one ablation variant (its overrides applied, without the variants block)."""
    data = cfg.model_dump(mode="json", exclude={"variants"})
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in cfg.variants[name].items()]
    out = config_from_dict(data, f"variants.{name}", overrides)
    out.name = f"{cfg.name}/{name}"
    return out


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
