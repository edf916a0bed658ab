"""The thin DeepSpeed trainer: one stage at a time, every stage the same loop.

    deepspeed -m vlmfast.train --config recipes/X.yaml [key=value ...]     # any number of ranks
    python -m vlmfast.train --config recipes/X.yaml [key=value ...]        # one process
    vlmfast train --config recipes/X.yaml

Per step:  batch -> trunk hidden states [B, T, H] -> loss (vlmfast.losses, through the lm_head's
forward) -> engine.backward -> engine.step -> metrics.jsonl, with the step's time split into phases
(timing/generate_s, logprobs_s, sync_s, update_s). Every eval.every steps and at stage boundaries, on the
stage's generation engine (timing/eval_s, never charged to a step): greedy accuracy, pass@k, diversity,
ECE, entropy on own samples, Δlog p probes, on the validation split and every extra eval split. Early
stopping keeps the best checkpoint and the next stage starts from it. Checkpoints are atomic;
`run.resume: auto` continues a killed run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import (
    Config,
    ConfigError,
    changed_keys,
    check_ranks,
    describe_keys,
    fingerprint,
    generation_engine,
    identity,
    load_config,
)
from .data.formats import RowError
from .data.loading import image_pixels, load_data, load_processor
from .data.prompts import reasoning_of, target_response
from .evaluate import eval_generations, eval_metrics, eval_seeds, sampled_count
from .faults import BadStep, Preemption, finite_everywhere, signal_if
from .models import head_vocab, load_model, tiny_vlm
from .nodes import check_shared_out_dir, fetch_once_per_node
from .ops import inputs_checked
from .probes import DeltaLogpProbe, EarlyStopping, entropy_means, sample_entropy_sums
from .ranks import gathered_in_order, global_means, reduce_over_ranks, shard
from .ranks import is_main as _is_main
from .rollout import Sampling, make_engine
from .rollout.vllm_engine import VLLMMemoryError
from .stages import (
    STEP_FUNCTIONS,
    StageContext,
    auto_l_floor,
    mean_over_ranks,
    micro_batches_per_step,
    needs_reference,
    restore_rollout,
    rollout_state,
    rows_per_rank,
)
from .tracking import open_trackers
from .zero import engine_forward, frozen_engine, gathered_for_generation, partitioned_loading


class Preempted(RuntimeError):
    """A signal (SIGTERM, SIGUSR1) stopped the run after a checkpoint: not a failure, resumable."""


class DataError(ValueError):
    """A dataset that cannot be read (missing file, image or column): named by file and row."""


RECIPE_FILE = "recipe.json"  # the fingerprint and resolved recipe of the run that trained this directory


def check_run_dir(cfg: Config) -> None:
    """A run directory is only ever continued by the recipe that made it: with run.resume: auto, a changed
    recipe is refused, naming the keys (run.resume: never, or another run.name, starts over)."""
    path = cfg.run_dir / RECIPE_FILE
    if cfg.run.resume != "auto" or not path.exists():
        return
    made = json.loads(path.read_text())
    if made["fingerprint"] != fingerprint(cfg):
        keys = changed_keys(made["recipe"], identity(cfg))
        raise ConfigError(f"run.name: {cfg.run_dir} was trained by another recipe (changed: {', '.join(keys)}); "
                          "resume with the same recipe, start over with run.resume=never, or pick a new run.name")


def _init_distributed(device: str, timeout_s: int = 600) -> None:
    """The run's world: from the launcher (deepspeed, torchrun, srun), or a one-rank world for a single process.
    A collective that waits longer than `timeout_s` (a dead rank) fails instead of idling DeepSpeed's 30 minutes."""
    import datetime

    import deepspeed

    from .launch import srun_world

    if torch.distributed.is_initialized():
        return
    os.environ.update(srun_world(os.environ))
    if device == "cuda":  # before anything touches the GPU: this rank's device is LOCAL_RANK's, not cuda:0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))


def ds_config(cfg: Config, micro_batch: int, micro_steps: int = 1) -> dict:
    """DeepSpeed's config; `micro_steps` backward passes per trainer step (GRPO's micro-batches) multiply
    deepspeed.grad_accum into DeepSpeed's gradient accumulation."""
    d = cfg.deepspeed
    zero = {"stage": d.zero_stage}
    if d.zero_stage:
        zero.update({k: getattr(d, k) for k in ("overlap_comm", "reduce_bucket_size") if getattr(d, k) is not None})
    if d.zero_stage == 3:
        zero.update({k: getattr(d, k) for k in ("stage3_param_persistence_threshold", "stage3_max_live_parameters",
                                                "stage3_prefetch_bucket_size") if getattr(d, k) is not None})
        if d.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = d.zero_hpz_partition_size
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": d.grad_accum * micro_steps,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _optimizer(cfg: Config, stage, model, device: str):
    """AdamW over trainable params; the vision tower's (and its merger's) lr is scaled by
    model.vision_lr_mult: from random weights the image pathway must grow much faster than the LM."""
    vision, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vision if ".visual." in f".{name}" else rest).append(p)
    groups = [{"params": rest, "lr": stage.lr}]
    if vision:
        groups.append({"params": vision, "lr": stage.lr * cfg.model.vision_lr_mult})
    for g in groups:
        g["base_lr"] = g["lr"]
    if device == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)


def lr_scale(stage):
    """step (0-based) -> lr multiplier from transformers' schedule (`get_scheduler`): linear warm-up that counts
    the step being taken (step 0 trains at 1/warmup_steps, not at 0), then constant, linear or cosine decay
    that reaches its last value at the stage's last step. A pure function of the step: a resumed run needs no
    scheduler state to land on the same learning rates."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(stage.lr_schedule, stage.lr_schedule)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    lam = get_scheduler(name, dummy, num_warmup_steps=stage.warmup_steps, num_training_steps=stage.steps).lr_lambdas[0]
    return lambda step: lam(step + 1) if step < stage.warmup_steps else lam(step)


def _set_lr(optimizer, scale, step: int) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * scale(step)


def _load_policy(cfg: Config, path: str | None, device: str, processor=None):
    """A model + processor from `path` (default model.path): tiny:student / tiny:teacher, a hub name
    or a local checkpoint. Under ZeRO-3 a checkpoint loads straight into its partitions (a tiny model
    is built whole and partitioned by deepspeed.initialize: zero.Init would draw other random weights)."""
    m = cfg.model
    path = path or m.path
    model, proc = _load_model_and_processor(cfg, path, device, processor)
    image_pixels(cfg, proc)
    return model, proc


def _fit_vllm_budget(cfg: Config, data: dict, processor) -> tuple[dict, int, int]:
    """The prompts within vllm.max_model_len, the budget (when not given: the longest prompt plus the longest
    response) and the longest prompt kept; the dropped ones counted on stdout."""
    from .data.budget import fit_to_budget

    data, limit, dropped, longest = fit_to_budget(cfg, data, processor)
    if _is_main():
        for split, n in dropped.items():
            if n:
                print(f"data: dropped {n} of {n + len(data[split])} '{split}' prompts longer than "
                      f"vllm.max_model_len={limit} with their response budget", flush=True)
    return data, limit, longest


def _load_model_and_processor(cfg: Config, path: str, device: str, processor=None):
    m = cfg.model
    if path.startswith("tiny:"):
        model, proc = tiny_vlm(path[5:], seed=cfg.run.seed, processor=processor)
        from .models import freeze

        freeze(model, vision=m.freeze_vision, projector=m.freeze_projector, llm=m.freeze_llm)
        return model.to(device), proc
    with partitioned_loading(ds_config(cfg, 1)):
        return load_model(path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                          gradient_checkpointing=m.gradient_checkpointing, liger=m.liger, device=device,
                          freeze_vision=m.freeze_vision, freeze_projector=m.freeze_projector,
                          freeze_llm=m.freeze_llm)


def _frozen_model(cfg: Config, path: str | None, device: str, processor, micro: int):
    """A reference or teacher: loaded from `path` (never copied from the policy), frozen, as its own
    DeepSpeed engine without optimizer, ZeRO-3 partitioned when the policy is. Returns the engine."""
    return frozen_engine(_load_policy(cfg, path, device, processor)[0], ds_config(cfg, micro))


def _vllm_options(cfg: Config, stage, device: str, role: str = "policy", max_model_len: int | None = None) -> dict:
    """The colocated vLLM engine's options from the recipe's vllm section. With sleep mode (on GPUs by default)
    it frees its memory between generations: the policy's at level 2 (every wake resends its weights), the
    teacher's, whose weights never change, at level 1 (kept on the host)."""
    v = cfg.vllm
    sleep = v.sleep_mode == "on" or (v.sleep_mode == "auto" and device == "cuda")
    index = next(i for i, s in enumerate(cfg.stages) if s is stage)
    share_key = (f"stages[{index}].vllm_memory_share={stage.vllm_memory_share}" if role == "policy" else
                 f"vllm.teacher_memory_share={v.teacher_memory_share}")
    kw = {"role": role, "sleep_mode": sleep, "sleep_level": 2 if role == "policy" else 1, "memory_key": share_key,
          "max_model_len": max_model_len or v.max_model_len or 4096, "enforce_eager": v.enforce_eager,
          "tensor_parallel_size": v.tensor_parallel_size,
          "limit_mm_per_prompt": {"image": v.limit_mm_per_prompt}}
    if device == "cuda":
        kw["gpu_memory_utilization"] = stage.vllm_memory_share if role == "policy" else v.teacher_memory_share
    kw.update({k: getattr(v, k) for k in ("max_num_seqs", "max_num_batched_tokens") if getattr(v, k) is not None})
    pixels = {k: getattr(v, f"image_{k}") for k in ("min_pixels", "max_pixels") if getattr(v, f"image_{k}")}
    if pixels:  # vLLM's processor resizes as the trainer's does (the processor gets them at load)
        kw["mm_processor_kwargs"] = pixels
    return kw


def _generation_options(cfg: Config, engine) -> dict:
    """HF-engine options for a ZeRO-3 policy: gather it once per generate call (default), or keep it
    partitioned and decode in lock-step across ranks."""
    d = cfg.deepspeed
    if d.zero_stage != 3:
        return {}
    if d.gather_for_generation:
        return {"gather": lambda: gathered_for_generation(engine)}
    return {"synced_ranks": torch.distributed.get_world_size() > 1}


class MetricsLog:
    """metrics.jsonl and the trackers of run.report_to (vlmfast.tracking), written by rank 0."""

    def __init__(self, cfg: Config, keep_until: tuple[int, int] | None):
        self.path = cfg.run_dir / "metrics.jsonl"
        self.trackers = []
        if not _is_main():
            return
        if keep_until is not None and self.path.exists():
            # resume: drop records past the checkpoint we continue from
            kept = [line for line in self.path.read_text().splitlines()
                    if line and (lambda r: (r["stage_index"], r["step"]) <= keep_until)(json.loads(line))]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif keep_until is None and self.path.exists():
            self.path.unlink()
        self.trackers = open_trackers(cfg.run.report_to, cfg.run_dir, cfg.run.name, cfg.to_dict())

    def write(self, record: dict) -> None:
        if not _is_main():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)


def _peak_memory_mb() -> float:
    """This step's peak of the memory the caching allocator reserved on the GPU (what the driver lends: an
    out-of-memory happens there, not at the allocated peak), reset for the next step; on the CPU the process's
    peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_reserved() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _throughput(tokens: int, seconds: float) -> dict:
    """The world's tokens per second (every rank's tokens over the slowest rank's step) and the highest peak
    memory of any rank."""
    total = reduce_over_ranks(torch.tensor([float(tokens)], dtype=torch.float64)).item()
    slowest, peak = reduce_over_ranks(torch.tensor([seconds, _peak_memory_mb()], dtype=torch.float64), "max").tolist()
    return {"tokens_per_s": total / max(slowest, 1e-9), "peak_mem_mb": peak}


def _global_metrics(ctx, metrics: dict) -> dict:
    """The step's metrics over all ranks (ranks.global_means): token means weighted by each rank's tokens."""
    mine = {k: float(_scalar(v)) for k, v in metrics.items() if k != "loss"}
    return global_means(mine, token_weighted=ctx.extra.pop("token_weighted", ()),
                        tokens=ctx.extra.pop("metric_tokens", 1.0))


def eval_line(stage: str, step: int, rec: dict) -> str:
    """One printed line per evaluation: each split's greedy accuracy, pass@k and entropy."""
    def shown(key: str) -> bool:
        split, _, metric = key.partition("/")
        return split != "timing" and (metric in ("accuracy", "entropy") or
                                      (metric.startswith("pass@") and not metric.endswith(("_lo", "_hi"))))

    parts = [f"{k} {v:.3f}" for k, v in rec.items() if isinstance(v, (int, float)) and shown(k)]
    return f"[{stage}] eval at step {step} ({rec['timing/eval_s']:.1f} s): " + ", ".join(parts)


def _scalar(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def evaluate(cfg: Config, model, processor, data: dict, probe: DeltaLogpProbe | None, seed: int, generating
             ) -> tuple[dict, list]:
    """Every eval split and the probes, sharded over the ranks: each generates and scores every world-th problem
    (greedy, and samples seeded per problem: the same samples whichever rank draws them) and runs the entropy
    forwards of its own samples; results are gathered, so every rank computes the record one process would.
    `generating()` is the generation engine's block (StageContext.generating): every generation of the
    evaluation runs inside one, and every forward after it, with a colocated engine asleep."""
    e = cfg.eval
    dist = torch.distributed.is_initialized()
    rank, size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    splits = {split: examples[: e.num_problems] for split, examples in data.items() if split != "train"}
    gen, probe_greedy = {}, None
    with generating() as engine:
        for split, part in splits.items():
            m = sampled_count(len(part), e.sample_problems)
            g_idx, _ = shard(len(part), rank, size)
            s_idx, s_real = shard(m, rank, size)
            seeds = eval_seeds(seed, m)
            greedy, groups = eval_generations(engine, [part[i] for i in g_idx], [part[i] for i in s_idx],
                                              n_samples=e.n_samples, temperature=e.temperature,
                                              max_new_tokens=e.max_new_tokens, seeds=[seeds[i] for i in s_idx])
            gen[split] = (g_idx, greedy, m, s_idx, s_real, groups)
        if probe is not None:
            probe_greedy = engine.generate(probe.problems, probe.images, n=1,
                                           sampling=Sampling(temperature=0.0, max_new_tokens=e.max_new_tokens))
    metrics, shown = {}, []
    for split, (g_idx, greedy, m, s_idx, s_real, groups) in gen.items():
        part = splits[split]
        all_greedy = gathered_in_order(greedy, g_idx, len(part))
        all_groups = gathered_in_order(groups[:s_real], s_idx[:s_real], m)
        split_metrics, samples = eval_metrics(processor, part, all_greedy, all_groups, n_samples=e.n_samples,
                                              ks=e.k, seed=seed)
        # entropy of this rank's own samples (the padding's forwards run, uncounted), summed over the ranks
        reps = [part[i] for i in s_idx for _ in range(e.n_samples)]
        keep = [j < s_real for j in range(len(s_idx)) for _ in range(e.n_samples)]
        sums = sample_entropy_sums(model, processor, [x.problem for x in reps], [x.images for x in reps],
                                   [c for g in groups for c in g], keep=keep)
        split_metrics.update(entropy_means(reduce_over_ranks(sums)))
        metrics.update({f"{split}/{k}": v for k, v in split_metrics.items()})
        metrics[f"{split}/pass_curve"] = samples["pass_curve"]
        shown += [{"split": split, **x} for x in samples["examples"]]
    if probe is not None:
        metrics.update(probe(model, processor, [g[0].text for g in probe_greedy]))
    return metrics, shown


def record_probe_baseline(cfg: Config, generating, model, processor, probe: DeltaLogpProbe) -> None:
    """The probes' lbar_0 (the first call records it), with the greedy responses of the policy now."""
    with generating() as engine:
        greedy = engine.generate(probe.problems, probe.images, n=1,
                                 sampling=Sampling(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens))
    probe(model, processor, [g[0].text for g in greedy])


def _make_probe(cfg: Config, data: dict) -> DeltaLogpProbe | None:
    n = cfg.eval.probes
    val = data.get("val") or []
    if not n or not val:
        return None
    rng = random.Random(cfg.run.seed)
    exs = val[-n:]  # held out from the evaluation slice when the split is large enough
    neg = [(e.negatives and rng.choice(e.negatives)) or e.answer + "?" for e in exs]
    return DeltaLogpProbe(problems=[e.problem for e in exs], images=[e.images for e in exs],
                          positives=[target_response(reasoning_of(cfg, e), e.answer) for e in exs],
                          negatives=[target_response(reasoning_of(cfg, e), x) for e, x in zip(exs, neg)])


def run(cfg: Config) -> dict:
    """Run every stage of the recipe in order; returns {stage name: final eval metrics}."""
    torch.set_num_threads(cfg.run.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per stage: no "Writing model shards" / "Loading weights" bars
    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    _init_distributed(device, cfg.run.dist_timeout_s)
    check_ranks(cfg, torch.distributed.get_world_size())
    check_shared_out_dir(Path(cfg.run.out_dir))  # several nodes: one run directory for all, or stop here
    fetch_once_per_node(cfg)  # hub model and data: each node's LOCAL_RANK 0 first
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    check_run_dir(cfg)
    try:  # before the run directory exists: bad data leaves nothing behind
        data = load_data(cfg)
    except (RowError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    processor, max_model_len, longest = None, None, None
    if any(generation_engine(cfg, s) == "vllm" for s in cfg.stages):  # prompts over vLLM's budget dropped here
        processor = load_processor(cfg)
        data, max_model_len, longest = _fit_vllm_budget(cfg, data, processor)
    if device == "cuda":  # a recipe that cannot fit stops here, naming what does not, before any model loads
        from .data.budget import longest_prompt
        from .plan import check_fits

        if longest is None:  # no vLLM stage: the prompts were not counted yet
            processor = load_processor(cfg)
            longest = longest_prompt(processor, data)
        check_fits(cfg, gpus=torch.distributed.get_world_size(), prompt_tokens=longest,
                   gpu_memory=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / RECIPE_FILE).write_text(json.dumps({"fingerprint": fingerprint(cfg), "recipe": identity(cfg)},
                                                      default=str))
    resume_from = ckpt.latest(ckpt_root) if cfg.run.resume == "auto" else None
    state = ckpt.read_state(resume_from) if resume_from else None
    world = torch.distributed.get_world_size()
    if state is not None and state.get("world_size", world) != world:  # before anything loads from it
        raise ConfigError(f"{resume_from} was written by {state['world_size']} ranks and this run has {world}: "
                          f"resume it on {state['world_size']} ranks, or give a new run.name to start over")
    keep = (state["stage_index"], state["step"]) if state else None
    log = MetricsLog(cfg, keep)
    probe = _make_probe(cfg, data)
    if probe is not None and state and state.get("probe_baseline"):
        probe.baseline = state["probe_baseline"]
    timings = dict(state.get("timings", {})) if state else {}
    results = dict(state.get("results", {})) if state else {}
    start_stage = state["stage_index"] if state else 0
    # the policy a stage starts from: the previous stage's final (best) checkpoint
    policy_path = state["stage_start"] if state else None
    with Preemption() as preemption:
        for si in range(start_stage, len(cfg.stages)):
            stage = cfg.stages[si]
            name = stage.name or f"{si}-{stage.type}"
            resuming = state is not None and si == state["stage_index"] and not state.get("stage_done")
            if state is not None and si == state["stage_index"] and state.get("stage_done"):
                policy_path = state["next_stage_start"]
                continue
            model, processor = _load_policy(cfg, policy_path, device, processor)
            t0 = time.time()
            final_path, metrics = run_stage(cfg, si, name, stage, model, processor, data, log, ckpt_root, probe,
                                            policy_path, state if resuming else None, timings, results,
                                            preemption, max_model_len=max_model_len)
            timings[name] = timings.get(name, 0.0) + time.time() - t0
            results[name] = metrics
            policy_path = str(final_path)
            state = None
            if si + 1 < len(cfg.stages) and preemption.requested():  # the signal came during the stage's last step
                raise Preempted(f"stopped after stage {name} on a signal: run the same command to resume")
    ckpt.finish_deletions()
    if _is_main():
        (run_dir / "results.json").write_text(json.dumps({"results": results, "timings_s": timings,
                                                          "final_model": policy_path}, indent=1))
        print(f"done: results in {run_dir / 'results.json'}, final model {policy_path}", flush=True)
    return results


def run_stage(cfg, si, name, stage, model, processor, data, log, ckpt_root, probe, start_path, state, timings,
              results, preemption, max_model_len=None):
    import deepspeed

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    n_micro = micro_batches_per_step(stage, world)
    micro = -(-rows_per_rank(stage, world) // n_micro)  # the largest micro-batch
    optimizer = _optimizer(cfg, stage, model, next(model.parameters()).device.type)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=ds_config(cfg, micro, n_micro))
    policy = engine.module
    ctx = StageContext(cfg=cfg, stage=stage, index=si, model=policy, processor=processor, train=data["train"],
                       engine_forward=lambda fn: engine_forward(engine, fn))
    device = next(policy.parameters()).device.type
    gen = generation_engine(cfg, stage)
    engine_kw = (_generation_options(cfg, engine) if gen == "hf" else
                 _vllm_options(cfg, stage, device, max_model_len=max_model_len))
    ctx.engine = make_engine(gen, policy, processor, **engine_kw)  # evaluation samples from it too
    if gen == "vllm" and cfg.vllm.offload_optimizer:
        ctx.optimizer_states = (engine.offload_states, engine.reload_states)
    frozen = []  # reference / teacher engines: kept alive with the stage
    if needs_reference(stage):
        frozen.append(_frozen_model(cfg, start_path, device, processor, micro))  # pi_ref <- policy at stage start
        ctx.reference = frozen[-1].module
    if stage.type == "opd":
        frozen.append(_frozen_model(cfg, stage.teacher, device, processor, micro))
        ctx.teacher = frozen[-1].module
        if head_vocab(ctx.teacher) != head_vocab(policy):
            raise ConfigError(f"stages[{si}].teacher: vocabulary {head_vocab(ctx.teacher)} differs "
                              f"from the student's {head_vocab(policy)}")
        if stage.opd_mode == "sampled":
            teacher_kw = ({} if stage.engine == "hf" else
                          _vllm_options(cfg, stage, device, role="teacher", max_model_len=max_model_len))
            ctx.extra["teacher_engine"] = make_engine(stage.engine, ctx.teacher, processor, **teacher_kw)
    stopper = None
    if stage.early_stopping is not None:
        es = stage.early_stopping
        stopper = EarlyStopping(metric=es.metric, mode=es.mode, patience=es.patience, min_delta=es.min_delta)
    start_step, best_tag = 0, None
    if state is not None:
        engine.load_checkpoint(str(ckpt_root / state["tag"]), tag="engine")
        mine = ckpt.read_rank_state(ckpt_root / state["tag"]) or {}
        ckpt.set_rng_state(mine.get("rng", state["rng"]))  # this rank's generators (older checkpoints: rank 0's)
        if mine.get("rollout") is not None:  # killed inside a rollout batch: continue it, do not redraw it
            restore_rollout(ctx, mine["rollout"])
        ctx.policy_updated()  # an engine with its own weights has the stage-start ones: synced before it samples
        start_step = state["step"]
        best_tag = state.get("best_tag")
        if stopper is not None and state.get("early_stopping"):
            stopper.load_state_dict(state["early_stopping"])
        ctx.l_floor = state.get("l_floor")
    if stage.type == "cw_dpo" and ctx.l_floor is None:
        ctx.l_floor = auto_l_floor(ctx) if stage.l_floor == "auto" else stage.l_floor
    step_fn = STEP_FUNCTIONS[stage.type]
    scale = lr_scale(stage)

    def save(tag, step):
        """A step checkpoint (engine state: what a resume reads) or a hand-off one (best-/final-: the HF weights
        the next stage loads, no optimizer states)."""
        step_ckpt = tag.startswith("step-")
        return ckpt.save(ckpt_root, tag, engine, policy, processor, {
            "stage_index": si, "stage": name, "step": step, "tag": tag, "stage_start": start_path,
            "best_tag": best_tag, "early_stopping": stopper.state_dict() if stopper else None,
            "l_floor": ctx.l_floor, "probe_baseline": probe.baseline if probe else None,
            "timings": timings, "results": results, "world_size": world},
            with_engine=step_ckpt, with_hf=not step_ckpt, resumable=step_ckpt,
            rank_state={"rollout": rollout_state(ctx)})

    def do_eval(step):
        ctx.timer.show("eval")
        t = time.perf_counter()
        m, shown = evaluate(cfg, policy, processor, data, probe, seed=cfg.run.seed, generating=ctx.generating)
        signal_if(f"{si}:eval:{step}")
        rec = {"stage": name, "stage_index": si, "step": step, "kind": "eval", "timing/eval_s": time.perf_counter() - t,
               **{k: v for k, v in m.items() if not isinstance(v, list)}, "pass_curves": {
                   k: v for k, v in m.items() if isinstance(v, list)}}
        log.write(rec)
        if _is_main():
            tqdm.write(eval_line(name, step, rec))
            with (cfg.run_dir / "samples.jsonl").open("a") as f:
                for x in shown:
                    f.write(json.dumps({"stage": name, "step": step, **x}) + "\n")
        return rec

    last_eval = None
    if start_step == 0 and not cfg.eval.at_start and probe is not None and not probe.baseline:
        # no evaluation at the start, but Δlog p is measured from here: record the probes' baseline
        record_probe_baseline(cfg, ctx.generating, policy, processor, probe)
    if start_step == 0 and cfg.eval.at_start:
        last_eval = do_eval(0)
        if stopper is not None and stopper.update(0, last_eval)[0]:
            best_tag = f"best-{si}"
            save(best_tag, 0)
    bar = tqdm(range(start_step, stage.steps), desc=f"{name}", initial=start_step, total=stage.steps,
               disable=not _is_main(), dynamic_ncols=True)
    ctx.timer.on_phase = lambda phase: bar.set_description_str(f"{name} [{phase}]")  # the bar says what runs now
    stopped_early, done, bad_steps = False, start_step, 0
    for step in bar:
        signal_if(f"{si}:{step}")
        _set_lr(optimizer, scale, step)
        policy.train()
        ctx.timer.start()
        loss, metrics, skipped = 0.0, None, False
        # the fused ops check their inputs' values (host syncs) on the stage's first step only
        with inputs_checked(step == start_step):
            out = step_fn(ctx, step)  # rollouts (if any) happen in here, the engine awake for them only
            for k, (share, m) in enumerate([out] if isinstance(out, tuple) else out):  # one micro-batch at a time
                if not finite_everywhere(share):  # NaN/inf on any rank: every rank skips the update
                    if k:  # earlier micro-batches' gradients are already in DeepSpeed's buffers
                        raise BadStep(f"stage {name} step {step + 1}: a NaN/inf loss in micro-batch {k + 1} after "
                                      f"{k} backward passes: the update cannot be skipped cleanly; the last "
                                      "checkpoint holds the last good weights")
                    skipped = True
                    break
                # the shares add up to the step's loss: DeepSpeed must not divide them by its accumulation count
                engine.backward(share / cfg.deepspeed.grad_accum, scale_wrt_gas=False)
                engine.step()  # the optimizer steps at the accumulation boundary only
                loss, metrics = loss + share.detach(), m if m is not None else metrics
        bad_steps = bad_steps + 1 if skipped else 0
        if bad_steps > cfg.run.max_bad_steps:
            raise BadStep(f"stage {name}: {bad_steps} updates in a row had a NaN/inf loss (run.max_bad_steps="
                          f"{cfg.run.max_bad_steps}); the last checkpoint holds the last good weights")
        if not skipped:
            ctx.policy_updated()  # the engine (if it holds weights) syncs before it next samples: once per rollout
        done = step + 1
        loss = float("nan") if skipped else mean_over_ranks(loss.float()).item()  # each rank's share of the loss
        timing = ctx.timer.stop()
        rec = {"stage": name, "stage_index": si, "step": done, "kind": "train", "loss": loss,
               **(_global_metrics(ctx, metrics) if not skipped else {"skipped": 1}),
               "lr": optimizer.param_groups[0]["lr"], **timing,
               **_throughput(ctx.extra.pop("tokens", 0), timing["step_time_s"])}
        if skipped and _is_main():
            tqdm.write(f"[{name}] step {done}: NaN/inf loss, update skipped ({bad_steps} in a row)")
        if done % cfg.run.log_every == 0:
            log.write(rec)
        bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss", "reward", "entropy") if k in rec})
        if done % cfg.eval.every == 0 or done == stage.steps:
            last_eval = do_eval(done)
            if stopper is not None:
                is_best, should_stop = stopper.update(done, last_eval)
                if is_best:
                    best_tag = f"best-{si}"
                    save(best_tag, done)
                if should_stop:
                    stopped_early = True
        preempted = preemption.requested() and done < stage.steps  # SIGTERM / SIGUSR1 on any rank
        if (done % cfg.run.checkpoint_every == 0 or preempted) and done < stage.steps and not stopped_early:
            save(f"step-{si}-{done}", done)
            ckpt.prune(ckpt_root, keep_last=cfg.run.checkpoint_keep)
        if preempted:
            bar.close()
            raise Preempted(f"stage {name}: stopped after step {done} on a signal; checkpoint step-{si}-{done} "
                            "saved: run the same command to resume")
        if stopped_early:
            break
    bar.close()
    # hand-off: the best checkpoint under early stopping, else the last weights
    final_tag = best_tag if (stopper is not None and best_tag) else f"final-{si}"
    if final_tag == f"final-{si}":
        save(final_tag, done)
    # the step whose weights go on (the best evaluation's under early stopping): where the next stage starts
    last_eval = {**(last_eval or {}), "handoff_step": stopper.best_step if final_tag == best_tag else done}
    final_path = ckpt_root / final_tag / "hf"
    ckpt.save(ckpt_root, f"done-{si}", engine, policy, processor, {
        "stage_index": si, "stage": name, "step": stage.steps, "tag": f"done-{si}", "stage_done": True,
        "next_stage_start": str(final_path), "stage_start": start_path, "timings": timings,
        "results": {**results, name: last_eval}, "probe_baseline": probe.baseline if probe else None,
        "world_size": world}, with_engine=False)  # the weights handed on are final_path's
    ckpt.prune(ckpt_root, keep_last=0)
    _free_stage(ctx, engine, frozen)
    return final_path, last_eval


def _free_stage(ctx, engine, frozen: list) -> None:
    """The stage's generation engines and DeepSpeed engines freed before the next stage builds its own (a
    colocated vLLM engine holds its share of the GPU until closed)."""
    import gc

    for gen in (ctx.engine, ctx.extra.pop("teacher_engine", None)):
        if gen is not None:
            gen.close()
    ctx.engine = ctx.reference = ctx.teacher = ctx.model = None
    ctx.extra.clear()
    for ds in (engine, *frozen):
        ds.destroy()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlmfast train", description="vlmfast trainer (see module docstring)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="recipe keys (section.key = default: meaning):\n" + describe_keys())
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.lr=1e-4")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return 0
    except (BadStep, VLLMMemoryError) as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
