"""Run configuration: YAML recipes -> typed dataclasses, with `key=value` overrides.

Every unknown key, missing file and impossible setting fails here, before any training, with a
message that names the key (e.g. `stages[1].group_size: batch of 12 prompts x 5 ...`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.prompts import DEFAULT_REASONING
from .data.synthetic import QUESTION_TYPES, SIZE_RANGE, check_options

STAGE_TYPES = ("sft", "opd", "grpo", "dpo", "cw_dpo")


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # auto: continue from the last checkpoint of this run dir; never: start over
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 2
    log_every: int = 1
    checkpoint_every: int = 50


@dataclass
class ModelConfig:
    path: str = "tiny:student"  # tiny:student | tiny:teacher | hub name | local path
    dtype: str = "float32"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    liger: bool = False
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    vision_lr_mult: float = 1.0  # the vision tower learns faster than the LLM on the tiny task


@dataclass
class SyntheticConfig:
    train: int = 2000
    val: int = 64
    ood: int = 64
    seed: int = 0
    image_size: int = 84
    question_types: list = field(default_factory=lambda: list(QUESTION_TYPES))
    max_shapes: int = 6
    size_range: list = field(default_factory=lambda: list(SIZE_RANGE))  # shape half-width / image side


@dataclass
class DataConfig:
    synthetic: SyntheticConfig | None = None
    train: str | None = None
    val: str | None = None
    eval_splits: dict = field(default_factory=dict)  # name -> path
    format: str = "geometry3k"  # geometry3k | mathvista
    reasoning: str = DEFAULT_REASONING  # <think> text of SFT targets; "auto": each example's `reasoning` column


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    grad_clip: float = 1.0
    grad_accum: int = 1
    # ZeRO-3: parameters of at most this many elements stay whole on every rank (DeepSpeed's default
    # 1e5 keeps a whole tiny model unpartitioned; 0 partitions everything, as a 7B model is)
    stage3_param_persistence_threshold: int | None = None
    stage3_max_live_parameters: int | None = None  # ZeRO-3: most elements gathered at once (default 1e9)
    gather_for_generation: bool = True  # ZeRO-3: whole weights for each generate call (false: stay partitioned)


@dataclass
class EvalConfig:
    every: int = 50
    num_problems: int = 64
    n_samples: int = 4
    k: list = field(default_factory=lambda: [1, 4])
    temperature: float = 1.0
    max_new_tokens: int = 32
    probes: int = 16  # size of the Δlog p probe set (0: off)
    at_start: bool = True


@dataclass
class EarlyStoppingConfig:
    metric: str = "val/accuracy"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class StageConfig:
    type: str = "sft"
    name: str | None = None
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 32  # sequences (sft, opd) / pairs (dpo) / prompts (grpo) per step
    temperature: float = 1.0
    max_new_tokens: int = 32
    engine: str = "hf"
    # sft
    label_smoothing: float = 0.0
    gentle: dict | None = None  # {variant, lam, margin, alpha}: SFT with gentle negatives
    # opd
    teacher: str | None = None  # path of the teacher checkpoint
    opd_mode: str = "full"  # full | sampled
    opd_on_policy: float = 1.0  # share of sequences sampled from the student; the rest are dataset targets (GKD)
    # grpo
    group_size: int = 4
    updates_per_rollout: int = 1  # optimizer updates (minibatches of batch_size prompts) per rollout batch
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    advantage_scale: str = "group"
    # dpo / cw_dpo
    beta: float = 0.1
    tau_c: float = 0.5
    l_floor: typing.Any = "auto"  # number | auto (mean lbar of the negatives at stage start) | batch
    on_policy_fraction: float = 0.5  # rho_mix: share of negatives that are the policy's own wrong answers
    early_stopping: EarlyStoppingConfig | None = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, raw, where: str):
    """Dataclass `cls` from a dict, recursively; unknown keys and wrong types name their path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        hint, path = hints[key], f"{where}.{key}" if where else key
        kwargs[key] = _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint, value, path):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is typing.Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    return value


def _set_override(raw: dict, dotted: str, value) -> None:
    """`stages.0.lr=1e-4` style overrides on the raw YAML dict."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if isinstance(node, list):
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path=None, overrides: list[str] | None = None, *, raw: dict | None = None) -> Config:
    """Read a YAML recipe (or a raw dict), apply `key=value` overrides, build and validate."""
    if raw is None:
        if path is None:
            raise ConfigError("no config: pass --config recipes/X.yaml")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        raw = yaml.safe_load(p.read_text()) or {}
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        try:
            _set_override(raw, key, yaml.safe_load(text))
        except (IndexError, ValueError, AttributeError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    stages = raw.pop("stages", None)
    cfg = _build(Config, raw, "")
    if not stages:
        raise ConfigError("stages: a recipe lists at least one stage")
    if not isinstance(stages, list):
        raise ConfigError("stages: expected a list of stages")
    cfg.stages = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(stages)]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    if cfg.run.resume not in ("auto", "never"):
        bad("run.resume", f"must be auto or never, got {cfg.run.resume!r}")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        bad("run.device", f"must be auto, cpu or cuda, got {cfg.run.device!r}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        bad("model.dtype", f"must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    mp = cfg.model.path
    if not mp.startswith("tiny:") and mp.startswith((".", "/")) and not Path(mp).exists():
        bad("model.path", f"{mp} does not exist")
    if mp.startswith("tiny:") and mp[5:] not in ("student", "teacher"):
        bad("model.path", f"tiny models are tiny:student and tiny:teacher, got {mp!r}")
    d = cfg.data
    if d.synthetic is None and d.train is None:
        bad("data", "give data.synthetic or data.train")
    if d.synthetic is not None:
        try:
            check_options(d.synthetic.question_types, d.synthetic.max_shapes, d.synthetic.size_range)
        except ValueError as e:
            raise ConfigError(f"data.synthetic.{e}") from None
    for key, p in [("data.train", d.train), ("data.val", d.val), *((f"data.eval_splits.{k}", v)
                                                                   for k, v in d.eval_splits.items())]:
        # local files must exist; "org/name:split" hub names go through the datasets library
        looks_local = p is not None and (p.startswith((".", "/")) or p.endswith((".parquet", ".jsonl")))
        if looks_local and not Path(p).exists():
            bad(key, f"{p} not found")
    if d.format not in ("geometry3k", "mathvista"):
        bad("data.format", f"must be geometry3k or mathvista, got {d.format!r}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        bad("deepspeed.zero_stage", f"must be 0..3, got {cfg.deepspeed.zero_stage}")
    for key in ("stage3_param_persistence_threshold", "stage3_max_live_parameters"):
        v = getattr(cfg.deepspeed, key)
        if v is not None and v < 0:
            bad(f"deepspeed.{key}", f"must be >= 0, got {v}")
    if cfg.deepspeed.precision not in ("fp32", "bf16"):
        bad("deepspeed.precision", f"must be fp32 or bf16, got {cfg.deepspeed.precision!r}")
    if any(k > cfg.eval.n_samples or k < 1 for k in cfg.eval.k):
        bad("eval.k", f"every k must be in [1, eval.n_samples={cfg.eval.n_samples}], got {cfg.eval.k}")
    for i, s in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if s.type not in STAGE_TYPES:
            bad(f"{key}.type", f"must be one of {STAGE_TYPES}, got {s.type!r}")
        if s.steps < 1 or s.batch_size < 1:
            bad(key, "steps and batch_size must be >= 1")
        if s.lr <= 0:
            bad(f"{key}.lr", f"must be > 0, got {s.lr}")
        if s.engine not in ("hf", "vllm"):
            bad(f"{key}.engine", f"must be hf or vllm, got {s.engine!r}")
        if s.updates_per_rollout < 1:
            bad(f"{key}.updates_per_rollout", f"must be >= 1, got {s.updates_per_rollout}")
        if s.type == "grpo" and s.group_size < 2:
            bad(f"{key}.group_size", f"GRPO needs >= 2 samples per prompt, got {s.group_size}")
        if s.type == "opd":
            if s.teacher is None:
                bad(f"{key}.teacher", "opd needs a teacher checkpoint path")
            if s.teacher.startswith((".", "/")) and not Path(s.teacher).exists():  # hub names load on use
                bad(f"{key}.teacher", f"{s.teacher} not found")
            if s.opd_mode not in ("full", "sampled"):
                bad(f"{key}.opd_mode", f"must be full or sampled, got {s.opd_mode!r}")
            if not 0 <= s.opd_on_policy <= 1:
                bad(f"{key}.opd_on_policy", f"must be in [0, 1], got {s.opd_on_policy}")
            if s.opd_mode == "sampled" and s.opd_on_policy < 1:
                bad(f"{key}.opd_on_policy", "the sampled-token KL estimate needs the student's own samples: "
                    "opd_on_policy < 1 works with opd_mode: full")
        if s.type in ("dpo", "cw_dpo"):
            if not (s.l_floor in ("auto", "batch") or isinstance(s.l_floor, (int, float))):
                bad(f"{key}.l_floor", f"must be a number, auto or batch, got {s.l_floor!r}")
            if not 0 <= s.on_policy_fraction <= 1:
                bad(f"{key}.on_policy_fraction", f"must be in [0, 1], got {s.on_policy_fraction}")
        if s.gentle is not None:
            allowed = {"variant", "lam", "margin", "alpha"}
            extra = set(s.gentle) - allowed
            if extra:
                bad(f"{key}.gentle", f"unknown key(s) {sorted(extra)}; known: {sorted(allowed)}")
        if s.early_stopping is not None and s.early_stopping.mode not in ("max", "min"):
            bad(f"{key}.early_stopping.mode", f"must be max or min, got {s.early_stopping.mode!r}")
