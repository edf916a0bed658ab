"""Run configuration: YAML recipes -> typed dataclasses, with `key=value` overrides.

Every unknown key, missing file and impossible setting fails here, before any training, with a
message that names the key (e.g. `stages[1].group_size: batch of 12 prompts x 5 ...`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.prompts import DEFAULT_REASONING
from .data.synthetic import QUESTION_TYPES, SIZE_RANGE, check_options
from .lora import LLM_LINEAR, check_settings
from .stages import STAGES, stage_of
from .stages.base import check_micro_batching

LR_SCHEDULES = ("constant", "linear", "cosine")
DATA_FORMATS = ("geometry3k", "mathvista")


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    name: str = "run"  # run directory runs/<name>: one recipe per name (a changed recipe is refused)
    out_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # model init, data order and sampling seeds
    resume: str = "auto"  # auto: continue from the run dir's last checkpoint; never: start over (old outputs set aside)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 2  # torch CPU threads per process
    log_every: int = 1  # write a train record every this many steps
    checkpoint_every: int = 50  # steps between resumable checkpoints (a multiple of updates_per_rollout)
    checkpoint_keep: int = 2  # step checkpoints kept (the newest); hand-off checkpoints (best-, final-) always are
    max_bad_steps: int = 3  # updates in a row with a NaN/inf loss (each skipped) before the run stops
    dist_timeout_s: int = 600  # a collective waiting this long (a dead rank or node) fails the run instead of hanging
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, trackio, mlflow; none


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: float = 32.0  # the adapters' scale is alpha / r
    dropout: float = 0.0  # dropout on the adapters' input (training forwards only)
    # the language model's linear layers that get adapters, by name, or all-linear (the lm_head never: train it
    # whole with modules_to_save)
    target_modules: typing.Any = field(default_factory=lambda: list(LLM_LINEAR))
    vision: str = "frozen"  # the vision tower's blocks: frozen | lora (every linear layer) | full
    projector: str = "frozen"  # the merger (vision -> language projector): frozen | lora | full
    modules_to_save: list[str] = field(default_factory=list)  # trained whole, saved with the adapters: [lm_head]
    # what the next stage starts from: merged (the adapted model as plain weights; new adapters on it) | adapters
    # (the same base and these adapters, trained on)
    handoff: str = "merged"
    # QLoRA: the language model's linear layers loaded in 4-bit NF4 through bitsandbytes (the vision tower and the head
    # stay in model.dtype); a checkpoint folder or hub name, ZeRO 0-2
    load_in_4bit: bool = False


@dataclass
class ModelConfig:
    path: str = "tiny:student"  # tiny:student | tiny:teacher | hub name | local path
    dtype: str = "float32"  # weights as loaded: float32 | bfloat16 (bfloat16 needs deepspeed.precision: bf16)
    attn_implementation: str = "auto"  # auto (flash-attention 2 on CUDA when installed, else sdpa) | sdpa | eager
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more time)
    # padding-free forwards (vlmfast/packing.py): a batch's real tokens back to back, per-sequence positions and
    # attention; false runs every forward on the padded batch (for comparison)
    packed_sequences: bool = True
    liger: bool = False  # Liger RMSNorm / RoPE / SwiGLU kernels (CUDA only); the head stays vlmfast's
    freeze_vision: bool = False  # freeze the vision tower (not its merger)
    freeze_projector: bool = False  # freeze the merger (vision -> language projector)
    freeze_llm: bool = False  # freeze the language model and lm_head
    vision_lr_mult: float = 1.0  # the vision tower's lr = lr x this (it learns faster on the tiny task)
    # LoRA through peft for every stage (vlmfast/lora.py): {r, alpha, dropout, target_modules, vision, projector,
    # modules_to_save, handoff}; the reference is the policy with its adapters off. None: full fine-tuning
    lora: LoraSettings | None = None


@dataclass
class SyntheticConfig:
    train: int = 2000  # training examples
    val: int = 64  # in-domain validation examples
    ood: int = 64  # shifted out-of-domain examples
    seed: int = 0  # seed of the generated task
    image_size: int = 84  # image side in pixels
    question_types: list[str] = field(default_factory=lambda: list(QUESTION_TYPES))  # which questions are asked
    max_shapes: int = 6  # most shapes in an image
    size_range: list[float] = field(default_factory=lambda: list(SIZE_RANGE))  # shape half-width / image side


@dataclass
class DataConfig:
    synthetic: SyntheticConfig | None = None  # the embedded synthetic task (train, val and ood splits)
    train: str | None = None  # training data: parquet/jsonl file or folder, or a hub name "org/name:split"
    val: str | None = None  # validation split (early stopping, probes), same forms as train
    eval_splits: dict[str, str] = field(default_factory=dict)  # more evaluation splits: name -> path
    format: str = "geometry3k"  # geometry3k | mathvista
    split_formats: dict[str, str] = field(default_factory=dict)  # a split's own format, e.g. {mathvista: mathvista}
    reasoning: str = DEFAULT_REASONING  # <think> text of SFT targets; "auto": each example's `reasoning` column


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0-3
    precision: str = "fp32"  # fp32 | bf16 (bf16 keeps fp32 master weights)
    grad_clip: float = 1.0  # gradient norm clip (0: off)
    grad_accum: int = 1  # micro-steps accumulated per optimizer step
    # ZeRO-3: parameters of at most this many elements stay whole on every rank (DeepSpeed's default
    # 1e5 keeps a whole tiny model unpartitioned; 0 partitions everything, as a 7B model is)
    stage3_param_persistence_threshold: int | None = None
    stage3_max_live_parameters: int | None = None  # ZeRO-3: most elements gathered at once (default 1e9)
    # ZeRO over the network (None: DeepSpeed's default; larger buckets: fewer, longer collectives, what links
    # between nodes want)
    overlap_comm: bool | None = None  # ZeRO 1-3: the gradients' reduce-scatter overlaps the backward
    reduce_bucket_size: int | None = None  # ZeRO 1-3: elements per reduce-scatter bucket
    stage3_prefetch_bucket_size: int | None = None  # ZeRO-3: elements of the next layers' parameters prefetched
    # ZeRO++ hierarchical partitioning (ZeRO-3): a second copy of the 16-bit weights sharded over this many ranks
    # (the GPUs of a node), so the forward's and backward's all-gathers stay inside a node; 1: off. It costs
    # 2 bytes per parameter / this many per GPU (`vlmfast plan` counts it)
    zero_hpz_partition_size: int = 1
    gather_for_generation: bool = True  # ZeRO-3: whole weights for each generate call (false: stay partitioned)


@dataclass
class EvalConfig:
    every: int = 50  # steps between evaluations (and at every stage's end)
    num_problems: int = 64  # problems per evaluation split
    n_samples: int = 4  # samples per problem for pass@k and diversity
    sample_problems: int | None = None  # of those, how many are sampled (pass@k, diversity, entropy); None: all
    k: list[int] = field(default_factory=lambda: [1, 4])  # pass@k for each k (<= n_samples)
    temperature: float = 1.0  # sampling temperature of the evaluation samples
    max_new_tokens: int = 32  # generation budget of an evaluation response
    probes: int = 16  # size of the Δlog p probe set (0: off)
    at_start: bool = True  # evaluate at step 0 of every stage


@dataclass
class VLLMConfig:
    # ranks that run one engine together, each sharding the weights (their prompts gathered within the group);
    # 1: an engine per rank
    tensor_parallel_size: int = 1
    sleep_mode: str = "auto"  # auto (on GPUs) | on | off: the engine frees its memory between generations
    # tokens of prompt + response a sequence may have; prompts over it are dropped at load (None: the longest
    # prompt plus the longest max_new_tokens of the recipe)
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # sequences decoded at once (None: vLLM's default)
    max_num_batched_tokens: int | None = None  # tokens per scheduler step (None: vLLM's default)
    enforce_eager: bool = False  # no CUDA graphs (less memory, slower decoding)
    limit_mm_per_prompt: int = 1  # images a prompt may carry
    image_min_pixels: int | None = None  # images resized to at least this many pixels (engine and processor)
    image_max_pixels: int | None = None  # images resized to at most this many pixels (engine and processor)
    teacher_memory_share: float = 0.3  # opd sampled: share of each GPU's memory the teacher's engine takes
    # ZeRO-3: the optimizer states (and gradient buffers) move to host memory while vLLM generates, and back
    # after (DeepSpeed's offload_states / reload_states, as OpenRLHF does): room for a larger KV cache
    offload_optimizer: bool = False


@dataclass
class EarlyStoppingConfig:
    metric: str = "val/accuracy"  # an evaluation metric (split/name) or a probe metric such as dlogp_pos
    mode: str = "max"  # max | min
    patience: int = 3  # evaluations without improvement before stopping
    min_delta: float = 0.0  # improvement smaller than this does not count


@dataclass
class StageConfig:
    type: str = "sft"  # sft | opd | grpo | dpo | cw_dpo
    name: str | None = None  # shown in records and reports (default "<index>-<type>")
    steps: int = 100  # optimizer steps
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps, then lr_schedule
    lr_schedule: str = "constant"  # after warm-up: constant | linear | cosine (decay to 0 at the last step)
    batch_size: int = 32  # sequences (sft, opd) / pairs (dpo) / prompts (grpo) per step
    temperature: float = 1.0  # softmax temperature of the loss and of sampling
    max_new_tokens: int = 32  # generation budget of a rollout / on-policy sample
    engine: str = "hf"  # rollout engine: hf | vllm
    vllm_memory_share: float = 0.5  # vllm: share of each GPU's memory vLLM takes (weights + KV cache)
    # sft
    label_smoothing: float = 0.0  # sft: uniform label smoothing in [0, 1)
    gentle: dict | None = None  # {variant, lam, margin, alpha}: SFT with gentle negatives
    # opd
    teacher: str | None = None  # opd: path of the teacher checkpoint
    opd_mode: str = "full"  # full | sampled
    opd_on_policy: float = 1.0  # share of sequences sampled from the student; the rest are dataset targets (GKD)
    # grpo
    group_size: int = 4  # grpo: samples per prompt
    updates_per_rollout: int = 1  # optimizer updates (minibatches of batch_size prompts) per rollout batch
    epochs_per_rollout: int | None = None  # grpo: passes over each rollout batch (default 1; TRL num_iterations)
    # every stage: rows (sequences; pairs for DPO and gentle negatives) per forward and backward on a rank at most
    # (default: the rank's whole batch or GRPO update), split as evenly as they go (20 rows at most 8: 7, 7, 6);
    # the step's gradient accumulates over its micro-batches, so only one micro-batch's activations are alive
    micro_batch_size: int | None = None
    # every stage: real tokens per forward and backward on a rank at most (padding-free: whole rows packed up to
    # it; a longer one runs alone), the micro-batch count the same on every rank; or micro_batch_size
    max_tokens_per_micro_batch: int | None = None
    # every stage: each step's rows (GRPO: each update's samples) redistributed across the ranks so each holds as many
    # and about as many tokens (verl's balance_batch): default (None) on; false keeps each row on the rank that drew
    # its prompt. CW-DPO with l_floor: batch keeps its rows (its floor is the rank's batch's)
    balance_batch: bool | None = None
    clip_low: float = 0.2  # grpo: the ratio's lower clip is 1 - clip_low
    clip_high: float = 0.2  # grpo: the ratio's upper clip is 1 + clip_high
    dual_clip: float | None = None  # grpo: dual-clip bound (> 1) for negative advantages
    kl_coef: float = 0.0  # grpo: k3 KL to the reference (the policy at stage start)
    entropy_coef: float = 0.0  # grpo: entropy bonus
    # grpo: the objective, TRL's names: grpo | dapo | bnpo | dr_grpo | gspo | cispo (losses/grpo.py); it sets the
    # aggregation. None: the clipped surrogate with `aggregation`
    loss_type: str | None = None
    kl_estimator: str | None = None  # grpo: k1 | k2 | k3 for the KL to the reference (default k3; k1 in the reward)
    kl_in_reward: bool | None = None  # grpo: the KL (x kl_coef) taken from each sample's reward, not a loss term
    # grpo: importance sampling against the sampler (TRL's vllm_importance_sampling_*, for a sampler that is not
    # exactly the trainer, e.g. vLLM in bf16): each token's policy gradient weighed by w = pi_old / pi_sampler of the
    # token (is_level token) or of its sequence (sequence), clamped to [is_cap_low, tis_cap] (is_mode truncate) or
    # zeroed outside it (mask); off: both None
    tis_cap: float | None = None
    is_cap_low: float | None = None  # grpo: the importance weights' lower bound (with tis_cap the upper)
    is_level: str | None = None  # grpo: importance weights per token (default) | sequence
    is_mode: str | None = None  # grpo: truncate (default: clamp the weights) | mask (drop what lies outside)
    mask_truncated: bool | None = None  # grpo: DAPO's overlong filtering: responses cut at max_new_tokens get no loss
    # grpo: DAPO's soft overlong punishment: a response longer than max_new_tokens - overlong_buffer loses
    # overlong_penalty (default 1) x its tokens past that / overlong_buffer from its reward
    overlong_buffer: int | None = None
    overlong_penalty: float | None = None  # grpo: the largest overlong punishment (default 1), at max_new_tokens
    # grpo: reward functions by import path and weight, [{fn: "module:function", weight: w, args: {...}}]
    # (reward_plugins.py; default: vlmfast.rewards:accuracy 0.9 + vlmfast.rewards:format 0.1)
    rewards: list[dict] | None = None
    # grpo: DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more prompts sampled until
    # the rollout batch is full, at most max_sampling_rounds (default 4) rounds
    dynamic_sampling: bool | None = None
    max_sampling_rounds: int | None = None  # grpo: sampling rounds per rollout at most (dynamic_sampling)
    reward_workers: int | None = None  # grpo: processes the reward functions run in (default: this one)
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    advantage_scale: str | None = None  # group (default; none for loss_type dr_grpo) | batch | none
    # dpo / cw_dpo
    beta: float = 0.1  # dpo, cw_dpo: preference temperature
    tau_c: float = 0.5  # cw_dpo: cooling temperature
    l_floor: typing.Any = "auto"  # number | auto (mean lbar of the negatives at stage start) | batch
    on_policy_fraction: float = 0.5  # rho_mix: share of negatives that are the policy's own wrong answers
    early_stopping: EarlyStoppingConfig | None = None  # stop on a metric; the next stage starts from the best


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    stages: list = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_STAGE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StageConfig)}


def generation_engine(cfg: Config, stage) -> str:
    """The stage's generation engine: its own `engine`; an SFT stage (which only generates to evaluate) in a
    recipe that runs vLLM anywhere evaluates through vLLM too (HF generate at 7B is the slow path)."""
    if not stage_of(stage).samples_in_training and any(s.engine == "vllm" for s in cfg.stages):
        return "vllm"
    return stage.engine


SECTIONS = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "data.synthetic": SyntheticConfig,
            "deepspeed": DeepSpeedConfig, "eval": EvalConfig, "vllm": VLLMConfig, "stages[i]": StageConfig,
            "stages[i].early_stopping": EarlyStoppingConfig}


def key_meanings(cls) -> dict[str, str]:
    """field -> its one-line meaning: the comment on the field's line in this file, else the comment
    lines right above it (the dataclasses are the one place the keys are documented)."""
    import inspect

    meanings, above = {}, []
    for line in inspect.getsource(cls).splitlines()[2:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        name = text.split(":", 1)[0]
        if name.isidentifier() and name in {f.name for f in dataclasses.fields(cls)}:
            code, _, comment = text.partition("  # ")
            meanings[name] = comment.strip() or " ".join(above)
        above = []
    return meanings


def describe_keys() -> str:
    """Every recipe key with its default and meaning (`vlmfast train --help`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        meanings = key_meanings(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("synthetic", "early_stopping"):
                shown = "a section, off unless given"
            else:
                shown = repr(f.default_factory() if f.default is dataclasses.MISSING else f.default)
            lines.append(f"  {f.name} = {shown}: {meanings.get(f.name, '')}")
    return "\n".join(lines)


def identity(cfg: Config) -> dict:
    """What identifies the training a recipe describes: every key but how to continue and where records go
    (run.resume, run.report_to)."""
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("resume", "report_to")}
    return d


def fingerprint(cfg: Config) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (stages by index)."""
    out = []
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        old, new = dict(enumerate(old)), dict(enumerate(new))
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _build(cls, raw, where: str):
    """Dataclass `cls` from a dict, recursively; unknown keys and wrong types name their path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where or 'the recipe'}: unknown key(s) {unknown}; known: {sorted(names)}")
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
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()} if args else value
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


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def read_yaml(p: Path):
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: broken YAML at {_yaml_problem(e)}") from None


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """raw with each `key=value` (a dotted key, a YAML value) set; a malformed one is a ConfigError naming it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not a YAML value ({_yaml_problem(e)})") from None
        try:
            _set_override(raw, key, value)
        except (IndexError, ValueError, AttributeError, TypeError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return raw


def load_config(path=None, overrides: list[str] | None = None, *, raw: dict | None = None) -> Config:
    """Read a YAML recipe (or a raw dict), apply `key=value` overrides, build and validate."""
    if raw is None:
        if path is None:
            raise ConfigError("no config: pass --config recipes/X.yaml")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} {'is a folder' if p.is_dir() else 'not found'}")
        raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (run, model, data, ..., stages)")
    raw = apply_overrides(dict(raw), overrides)
    stages = raw.pop("stages", None)
    cfg = _build(Config, raw, "")
    if not stages:
        raise ConfigError("stages: a recipe lists at least one stage")
    if not isinstance(stages, list):
        raise ConfigError("stages: expected a list of stages")
    cfg.stages = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(stages)]
    validate(cfg)
    return cfg


def eval_splits(cfg: Config) -> list[str]:
    """The splits an evaluation covers (every split but train)."""
    names = ["val", "ood"] if cfg.data.synthetic is not None else []
    if cfg.data.val and "val" not in names:
        names.append("val")
    return names + [k for k in cfg.data.eval_splits if k not in names]


def eval_metric_names(cfg: Config) -> set[str]:
    """Every metric an evaluation record of this recipe holds (what early stopping can watch)."""
    from .evaluate import split_metric_names
    from .probes import PROBE_METRICS

    names = {f"{split}/{m}" for split in eval_splits(cfg) for m in split_metric_names(cfg.eval.k)}
    if cfg.eval.probes and "val" in eval_splits(cfg):
        names.update(PROBE_METRICS)
    return names


def _check_report_to(names) -> None:
    from .tracking import TRACKERS, missing

    if not isinstance(names, list) or not names or any(n not in TRACKERS for n in names):
        raise ConfigError(f"run.report_to: must be a list of {TRACKERS}, got {names!r}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"run.report_to: none goes alone, got {names}")
    absent = missing(names)
    if absent:
        raise ConfigError(f"run.report_to: {', '.join(absent)} is not installed (pip install {' '.join(absent)}), "
                          "or leave it out of run.report_to")


def _check_ranges(cfg: Config) -> None:
    """Every numeric key's range, each failing with the key's path."""
    def at_least(key, value, lo):
        if value is not None and not value >= lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {value}")

    for key in ("threads", "log_every", "checkpoint_every", "checkpoint_keep", "max_bad_steps", "dist_timeout_s"):
        at_least(f"run.{key}", getattr(cfg.run, key), 1)
    if not 0 < cfg.model.vision_lr_mult < math.inf:
        raise ConfigError(f"model.vision_lr_mult: must be a finite number > 0, got {cfg.model.vision_lr_mult}")
    if cfg.data.synthetic is not None:
        for key in ("train", "val", "ood"):
            at_least(f"data.synthetic.{key}", getattr(cfg.data.synthetic, key), 1)
        at_least("data.synthetic.image_size", cfg.data.synthetic.image_size, 28)  # one 28-pixel patch at least
    at_least("deepspeed.grad_accum", cfg.deepspeed.grad_accum, 1)
    at_least("deepspeed.grad_clip", cfg.deepspeed.grad_clip, 0)
    e = cfg.eval
    for key in ("every", "num_problems", "n_samples", "max_new_tokens"):
        at_least(f"eval.{key}", getattr(e, key), 1)
    at_least("eval.probes", e.probes, 0)
    if e.sample_problems is not None:
        at_least("eval.sample_problems", e.sample_problems, 1)
        if e.sample_problems > e.num_problems:
            raise ConfigError(f"eval.sample_problems: {e.sample_problems} is more than eval.num_problems="
                              f"{e.num_problems} (the sampled problems are the first of the greedy ones)")
    at_least("eval.temperature", e.temperature, 0)  # 0: greedy samples
    v = cfg.vllm
    if v.sleep_mode not in ("auto", "on", "off"):
        raise ConfigError(f"vllm.sleep_mode: must be auto, on or off, got {v.sleep_mode!r}")
    for key in ("tensor_parallel_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "limit_mm_per_prompt", "image_min_pixels", "image_max_pixels"):
        at_least(f"vllm.{key}", getattr(v, key), 1)
    if v.image_min_pixels and v.image_max_pixels and v.image_min_pixels > v.image_max_pixels:
        raise ConfigError(f"vllm.image_min_pixels: {v.image_min_pixels} is more than vllm.image_max_pixels="
                          f"{v.image_max_pixels}")
    if v.offload_optimizer and cfg.deepspeed.zero_stage != 3:
        raise ConfigError(f"vllm.offload_optimizer: needs deepspeed.zero_stage: 3 (DeepSpeed moves ZeRO-3's "
                          f"optimizer states only), got {cfg.deepspeed.zero_stage}")
    if not 0 < v.teacher_memory_share < 1:
        raise ConfigError(f"vllm.teacher_memory_share: must be in (0, 1), got {v.teacher_memory_share}")
    if not e.k:
        raise ConfigError("eval.k: give at least one k for pass@k")
    for i, s in enumerate(cfg.stages):
        key = f"stages[{i}]"
        for name in ("steps", "batch_size", "max_new_tokens"):
            at_least(f"{key}.{name}", getattr(s, name), 1)
        at_least(f"{key}.warmup_steps", s.warmup_steps, 0)
        if s.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{key}.lr_schedule: must be one of {LR_SCHEDULES}, got {s.lr_schedule!r}")
        at_least(f"{key}.weight_decay", s.weight_decay, 0)
        if s.early_stopping is not None:
            at_least(f"{key}.early_stopping.patience", s.early_stopping.patience, 1)
            at_least(f"{key}.early_stopping.min_delta", s.early_stopping.min_delta, 0)


def validate(cfg: Config) -> None:
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    _check_ranges(cfg)
    ga = cfg.deepspeed.grad_accum
    # a checkpoint or a stage end inside an accumulation would drop the gradients gathered so far
    if cfg.run.checkpoint_every % ga:
        bad("run.checkpoint_every", f"must be a multiple of deepspeed.grad_accum={ga}, got {cfg.run.checkpoint_every}")
    for i, s in enumerate(cfg.stages):
        if s.steps % ga:
            bad(f"stages[{i}].steps", f"must be a multiple of deepspeed.grad_accum={ga}, got {s.steps}")
    if cfg.model.dtype == "float16":
        bad("model.dtype", "float16 training is not supported (no loss scaling): use bfloat16 or float32")
    if cfg.model.dtype == "bfloat16" and cfg.deepspeed.precision == "fp32":
        bad("model.dtype", "bfloat16 weights with deepspeed.precision: fp32 would train bf16 weights without fp32 "
            "master weights; set deepspeed.precision: bf16 (or model.dtype: float32)")

    if cfg.model.lora is not None:
        check_settings(cfg.model.lora, bad)
        for key in ("freeze_vision", "freeze_projector", "freeze_llm"):
            if getattr(cfg.model, key):
                bad(f"model.{key}", "with model.lora the base is frozen and model.lora.vision / projector choose "
                    "what else trains (frozen | lora | full)")
        if cfg.model.lora.load_in_4bit and cfg.model.path.startswith("tiny:"):
            bad("model.lora.load_in_4bit", "a tiny model is built, not loaded, so it cannot be loaded in 4 bits: save "
                "it (vlmfast.models.save_pretrained) and give its folder as model.path")
        if cfg.model.lora.load_in_4bit and cfg.deepspeed.zero_stage == 3:
            bad("model.lora.load_in_4bit", "a 4-bit base is not partitioned by ZeRO-3 here: use deepspeed.zero_stage "
                "0-2 (the frozen 4-bit base is a quarter of the 16-bit one; only the adapters' states are sharded)")
        for i, s in enumerate(cfg.stages[1:], 1):
            if cfg.model.lora.handoff == "adapters" and stage_of(s).needs_reference(s):
                bad(f"stages[{i}].type", f"{s.type} reads a reference (the policy at stage start), which under LoRA "
                    "is the policy with its adapters off; model.lora.handoff: adapters starts this stage from the "
                    "previous stage's adapters, so that would be the base model, not the stage start: use "
                    "handoff: merged")
    name = Path(cfg.run.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:  # the run writes (and prunes) inside its folder
        bad("run.name", f"names a folder inside run.out_dir (relative, no '..'), got {cfg.run.name!r}")
    if Path(cfg.run.out_dir).exists() and not Path(cfg.run.out_dir).is_dir():
        bad("run.out_dir", f"{cfg.run.out_dir} is a file, not a folder")
    if cfg.data.synthetic is not None and (cfg.data.train is not None or cfg.data.val is not None):
        bad("data", "give data.synthetic or data.train / data.val, not both (the splits would mix two tasks)")
    if cfg.run.resume not in ("auto", "never"):
        bad("run.resume", f"must be auto or never, got {cfg.run.resume!r}")
    _check_report_to(cfg.run.report_to)
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
    for key, fmt in [("data.format", d.format), *((f"data.split_formats.{k}", v) for k, v in d.split_formats.items())]:
        if fmt not in DATA_FORMATS:
            bad(key, f"must be one of {DATA_FORMATS}, got {fmt!r}")
    for split in d.split_formats:
        if split not in ("train", "val", *d.eval_splits):
            bad(f"data.split_formats.{split}", f"no such split (data.train, data.val or data.eval_splits: "
                f"{', '.join(['train', 'val', *d.eval_splits])})")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        bad("deepspeed.zero_stage", f"must be 0..3, got {cfg.deepspeed.zero_stage}")
    for key in ("stage3_param_persistence_threshold", "stage3_max_live_parameters", "reduce_bucket_size",
                "stage3_prefetch_bucket_size"):
        v = getattr(cfg.deepspeed, key)
        if v is not None and v < 0:
            bad(f"deepspeed.{key}", f"must be >= 0, got {v}")
    if cfg.deepspeed.zero_hpz_partition_size < 1:
        bad("deepspeed.zero_hpz_partition_size", f"must be >= 1, got {cfg.deepspeed.zero_hpz_partition_size}")
    if cfg.deepspeed.zero_hpz_partition_size > 1 and cfg.deepspeed.zero_stage != 3:
        bad("deepspeed.zero_hpz_partition_size", f"ZeRO++ hierarchical partitioning is ZeRO-3's, not stage "
            f"{cfg.deepspeed.zero_stage}'s")
    if cfg.deepspeed.precision not in ("fp32", "bf16"):
        bad("deepspeed.precision", f"must be fp32 or bf16, got {cfg.deepspeed.precision!r}")
    if any(k > cfg.eval.n_samples or k < 1 for k in cfg.eval.k):
        bad("eval.k", f"every k must be in [1, eval.n_samples={cfg.eval.n_samples}], got {cfg.eval.k}")
    for i, s in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if s.type not in STAGES:
            bad(f"{key}.type", f"must be one of {tuple(STAGES)}, got {s.type!r}")
        if s.steps < 1 or s.batch_size < 1:
            bad(key, "steps and batch_size must be >= 1")
        if not 0 < s.lr < math.inf:
            bad(f"{key}.lr", f"must be a finite number > 0, got {s.lr}")
        if s.engine not in ("hf", "vllm"):
            bad(f"{key}.engine", f"must be hf or vllm, got {s.engine!r}")
        if not 0 < s.vllm_memory_share < 1:
            bad(f"{key}.vllm_memory_share", f"must be in (0, 1), got {s.vllm_memory_share}")
        if s.updates_per_rollout < 1:
            bad(f"{key}.updates_per_rollout", f"must be >= 1, got {s.updates_per_rollout}")
        for other in {k for k in STAGES.values() if k is not stage_of(s)}:  # keys only another type reads
            for name, what in other.own_keys.items():
                if getattr(s, name) != _STAGE_DEFAULTS[name]:
                    bad(f"{key}.{name}", f"{what} are for {' and '.join(other.types)} stages, not {s.type!r}")
        if s.early_stopping is not None and s.early_stopping.mode not in ("max", "min"):
            bad(f"{key}.early_stopping.mode", f"must be max or min, got {s.early_stopping.mode!r}")
        if s.early_stopping is not None and s.early_stopping.metric not in eval_metric_names(cfg):
            names = sorted(eval_metric_names(cfg))
            produced = (f"it produces {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}" if names else
                        "it evaluates nothing: give data.val (or data.eval_splits) to watch")
            bad(f"{key}.early_stopping.metric",
                f"no evaluation of this recipe produces {s.early_stopping.metric!r}; {produced}")
        check_micro_batching(stage_of(s), s, key, bad)
        stage_of(s).check(s, key, bad)  # the stage type's own keys and its loss's hyperparameters


def check_installed(cfg: Config) -> None:
    """What the run needs installed, before any model loads (a recipe loads without it: `vlmfast plan` on a laptop)."""
    uses = [i for i, s in enumerate(cfg.stages) if s.engine == "vllm"]
    if uses and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"stages[{uses[0]}].engine: vllm is not installed here (pip install vllm; its CPU build: "
                          "docs/platform.md), or use engine: hf")


def check_ranks(cfg: Config, world: int) -> None:
    """Every stage's batch splits evenly over the ranks (a GRPO update's micro-batches then follow: at most
    micro_batch_size rows each, as even as they go), and the ranks into vLLM's tensor-parallel groups. `vlmfast
    plan --gpus N` checks the same."""
    tp = cfg.vllm.tensor_parallel_size
    if world % tp and any(generation_engine(cfg, s) == "vllm" for s in cfg.stages):
        raise ConfigError(f"vllm.tensor_parallel_size={tp} does not divide the {world} ranks")
    hpz = cfg.deepspeed.zero_hpz_partition_size
    if world % hpz:
        raise ConfigError(f"deepspeed.zero_hpz_partition_size={hpz} does not divide the {world} ranks (set it to the "
                          "GPUs of one node)")
    for si, stage in enumerate(cfg.stages):
        if stage.batch_size % world:
            fits = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if stage.batch_size % n == 0]
            raise ConfigError(f"stages[{si}].batch_size={stage.batch_size} is not divisible by the {world} ranks "
                              f"(it splits over {', '.join(map(str, fits))} ranks; or set a batch_size that "
                              f"{world} divides)")
