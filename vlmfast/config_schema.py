"""The recipe's keys: one dataclass per section, each key's default and its meaning in the comment beside it (the
one place keys are documented: `vlmfast train --help` reads them), and what identifies a recipe's training.
Loading and overrides: config.py; the checks of every value: config_checks.py."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .data.prompts import DEFAULT_REASONING
from .data.synthetic import QUESTION_TYPES, SIZE_RANGE
from .lora import LLM_LINEAR
from .stages import stage_of

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
    text_only_rows: bool = False  # a row without images is a text-only problem (default: refused as a missing image)


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


_STAGE_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                   for f in dataclasses.fields(StageConfig)}


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
