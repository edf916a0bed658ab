"""Every recipe value checked before any work, each failing with its key's path (`stages[1].group_size: ...`):
ranges, choices, combinations, a stage type's own keys; and, at run start, the ranks and what must be installed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from .config_schema import _STAGE_DEFAULTS, DATA_FORMATS, LR_SCHEDULES, Config, ConfigError, generation_engine
from .data.synthetic import check_options
from .lora import check_settings
from .stages import STAGES, stage_of
from .stages.base import check_micro_batching


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
        for name, (what, types) in stage_key_readers().items():  # keys only other types read
            if s.type not in types and getattr(s, name) != _STAGE_DEFAULTS[name]:
                bad(f"{key}.{name}", f"{what} are for {' and '.join(types)} stages, not {s.type!r}")
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


def stage_key_readers() -> dict[str, tuple[str, list[str]]]:
    """Each stage key a Stage class owns: what it sets, and the recipe types that read it (the class's types, or the
    fewer its type_keys names)."""
    out = {}
    for cls in dict.fromkeys(STAGES.values()):  # each class once, in the registry's order
        for name, what in cls.own_keys.items():
            types = out.get(name, (what, []))[1]
            out[name] = (what, types + [t for t in cls.type_keys.get(name, cls.types) if t not in types])
    return out


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
