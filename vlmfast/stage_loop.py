"""One stage of the trainer: open it, run its steps, hand its weights on.

    run_stage(...)                 -> (the weights the next stage starts from, the last evaluation)
      open_stage(...)              -> StageRun: the DeepSpeed engine, the generation engine, the reference and
                                      teacher the stage's Stage asks for, and what a resume left (weights, RNG,
                                      rollout in progress, the stage's own state)
      train_steps(run)             -> one step = the Stage's step (rollouts inside) -> backward + step per
                                      micro-batch -> metrics.jsonl -> evaluation -> checkpoint
      hand_off(run)                -> the best (early stopping) or final weights, as HF folders

What differs between stage types is behind vlmfast.stages.Stage; nothing here asks a stage's type. The tests reach
the loop's faults through one seam, faults.signal_if, at every step and evaluation.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError, generation_engine
from .evaluate import eval_generations, eval_metrics, eval_seeds, sampled_count
from .faults import BadStep, Preempted, finite_everywhere, signal_if
from .lora import AdaptersOff, adapter_base, is_adapter_folder
from .models import dropout_off, eval_mode, head_vocab
from .ops import inputs_checked
from .policy import ds_config, frozen_model
from .probes import DeltaLogpProbe, EarlyStopping, entropy_means, sample_entropy_sums
from .ranks import gathered_in_order, global_means, is_main, reduce_over_ranks, shard
from .rollout import Sampling, make_engine
from .stages import Stage, StageContext, mean_over_ranks, stage_of
from .stages import world as ranks_world
from .zero import engine_forward, gathered_for_generation


@dataclass
class StageRun:
    """Everything one stage's steps read and write; made by open_stage."""

    cfg: object
    index: int
    name: str
    stage: object  # StageConfig
    kind: Stage
    engine: object  # the policy's DeepSpeed engine
    optimizer: object
    ctx: StageContext
    frozen: list  # the reference's and teacher's DeepSpeed engines, kept alive with the stage
    run: dict  # what the whole run shares: processor, data, log, ckpt_root, probe, timings, results, preemption
    start_path: str | None  # the weights the stage started from (its reference's)
    stopper: EarlyStopping | None = None
    start_step: int = 0
    done: int = 0  # steps taken
    best_tag: str | None = None
    best_eval: dict | None = None  # early stopping's best evaluation: the record of the weights best_tag holds
    last_eval: dict | None = None
    stopped_early: bool = False
    world: int = 1
    bad_steps: int = 0  # updates skipped in a row (NaN/inf loss): a resume continues the count
    elapsed_before: float = 0.0  # the stage's seconds before the checkpoint it resumed from
    started: float = field(default_factory=time.time)

    @property
    def policy(self):
        return self.engine.module

    @property
    def lora_base(self) -> str | None:
        """The base model the policy's adapters apply to (LoRA): the stage's start, or the base of the adapters it
        started from (lora.handoff: adapters)."""
        if self.cfg.model.lora is None:
            return None
        start = self.start_path or self.cfg.model.path
        return adapter_base(start) if is_adapter_folder(start) else start

    def save(self, tag: str, step: int):
        """A step checkpoint (engine state: what a resume reads) or a hand-off one (best-/final-: the HF weights
        the next stage loads, no optimizer states)."""
        r, step_ckpt = self.run, tag.startswith("step-")
        return ckpt.save(r["ckpt_root"], tag, self.engine, self.policy, r["processor"], {
            "stage_index": self.index, "stage": self.name, "step": step, "tag": tag, "stage_start": self.start_path,
            "best_tag": self.best_tag, "best_eval": self.best_eval,
            "early_stopping": self.stopper.state_dict() if self.stopper else None,
            **self.kind.state(self.ctx), "probe_baseline": r["probe"].baseline if r["probe"] else None,
            "timings": r["timings"], "results": r["results"], "world_size": self.world, "lora_base": self.lora_base,
            "bad_steps": self.bad_steps, "stage_elapsed_s": self.elapsed_before + time.time() - self.started},
            with_engine=step_ckpt, with_hf=not step_ckpt, resumable=step_ckpt,
            rank_state={"rollout": self.kind.rank_state(self.ctx)})

    def evaluate(self, step: int) -> dict:
        """An evaluation of the policy now: logged, printed, its shown samples appended to samples.jsonl."""
        cfg, r = self.cfg, self.run
        self.ctx.timer.show("eval")
        t = time.perf_counter()
        with eval_mode(self.policy):  # entropy and probe forwards without LoRA's dropout
            m, shown = evaluate(cfg, self.policy, r["processor"], r["data"], r["probe"], seed=cfg.run.seed,
                                generating=self.ctx.generating)
        signal_if(f"{self.index}:eval:{step}")
        rec = {"stage": self.name, "stage_index": self.index, "step": step, "kind": "eval",
               "timing/eval_s": time.perf_counter() - t, **{k: v for k, v in m.items() if not isinstance(v, list)},
               "pass_curves": {k: v for k, v in m.items() if isinstance(v, list)}}
        r["log"].write(rec)
        if is_main():
            tqdm.write(eval_line(self.name, step, rec))
            with (cfg.run_dir / "samples.jsonl").open("a") as f:
                for x in shown:
                    f.write(json.dumps({"stage": self.name, "stage_index": self.index, "step": step, **x}) + "\n")
        self.last_eval = rec
        return rec

    def keep_if_best(self, step: int, may_stop: bool = True) -> None:
        """Early stopping's verdict on the last evaluation: a new best is saved; patience spent stops the stage."""
        if self.stopper is None:
            return
        is_best, should_stop = self.stopper.update(step, self.last_eval)
        if is_best:
            self.best_tag, self.best_eval = f"best-{self.index}", self.last_eval
            self.save(self.best_tag, step)
        self.stopped_early = self.stopped_early or (should_stop and may_stop)


def run_stage(cfg, si, name, stage, model, run: dict, start_path, state, max_model_len=None):
    """Stage `si` from `model` (loaded from start_path), resumed from checkpoint `state` when given."""
    r = open_stage(cfg, si, name, stage, model, run, start_path, state, max_model_len)
    train_steps(r)
    return hand_off(r)


# ---- open ----------------------------------------------------------------------------------------------------

def open_stage(cfg, si, name, stage, model, run: dict, start_path, state, max_model_len=None) -> StageRun:
    import deepspeed

    kind = stage_of(stage)
    _, world = ranks_world()
    n_micro = kind.micro_batches(stage, world)
    micro = -(-kind.rows_per_rank(stage, world) // n_micro)  # the largest micro-batch
    optimizer = _optimizer(cfg, stage, model, next(model.parameters()).device.type)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=ds_config(cfg, micro, n_micro))
    policy, processor = engine.module, run["processor"]
    ctx = StageContext(cfg=cfg, stage=stage, index=si, model=policy, processor=processor, train=run["data"]["train"],
                       engine_forward=lambda fn: engine_forward(engine, fn))
    device = next(policy.parameters()).device.type
    gen = generation_engine(cfg, stage)
    engine_kw = (_generation_options(cfg, engine) if gen == "hf" else
                 _vllm_options(cfg, stage, device, max_model_len=max_model_len))
    ctx.engine = make_engine(gen, policy, processor, **engine_kw)  # evaluation samples from it too
    if gen == "vllm" and cfg.vllm.offload_optimizer:
        ctx.optimizer_states = (engine.offload_states, engine.reload_states)
    r = StageRun(cfg=cfg, index=si, name=name, stage=stage, kind=kind, engine=engine, optimizer=optimizer, ctx=ctx,
                 frozen=[], run=run, start_path=start_path, world=world)
    _open_frozen(r, device, micro, max_model_len)
    if stage.early_stopping is not None:
        es = stage.early_stopping
        r.stopper = EarlyStopping(metric=es.metric, mode=es.mode, patience=es.patience, min_delta=es.min_delta)
    if state is not None:
        _resume(r, state)
    kind.open(ctx, state)  # the stage's own start (CW-DPO's l_floor), or what the checkpoint kept of it
    return r


def _open_frozen(r: StageRun, device: str, micro: int, max_model_len) -> None:
    """The reference (pi_ref = the policy at stage start) and the teacher the Stage asks for, each as its own
    frozen DeepSpeed engine (a LoRA policy's reference is itself with its adapters off); the teacher's generation
    engine when it scores through one."""
    cfg, stage, ctx, processor = r.cfg, r.stage, r.ctx, r.run["processor"]
    if r.kind.needs_reference(stage) and cfg.model.lora is not None:
        ctx.reference = AdaptersOff(ctx.model)  # the stage-start policy is the base: its adapters start at B = 0
    elif r.kind.needs_reference(stage):
        r.frozen.append(frozen_model(cfg, r.start_path, device, processor, micro))
        ctx.reference = r.frozen[-1].module
    teacher = r.kind.teacher(stage)
    if teacher is None:
        return
    r.frozen.append(frozen_model(cfg, teacher, device, processor, micro))
    ctx.teacher = r.frozen[-1].module
    if head_vocab(ctx.teacher) != head_vocab(ctx.model):
        raise ConfigError(f"stages[{r.index}].teacher: vocabulary {head_vocab(ctx.teacher)} differs "
                          f"from the student's {head_vocab(ctx.model)}")
    if r.kind.teacher_engine(stage):
        teacher_kw = ({} if stage.engine == "hf" else
                      _vllm_options(cfg, stage, device, role="teacher", max_model_len=max_model_len))
        ctx.extra["teacher_engine"] = make_engine(stage.engine, ctx.teacher, processor, **teacher_kw)


def _resume(r: StageRun, state: dict) -> None:
    """Continue the stage from the step checkpoint `state` names: the engine's weights and optimizer, this rank's
    random generators and rollout in progress, early stopping's history."""
    tag_dir = r.run["ckpt_root"] / state["tag"]
    # a LoRA run's checkpoint holds the trainable parameters only: the frozen base is the one loaded
    r.engine.load_checkpoint(str(tag_dir), tag="engine", load_module_strict=r.cfg.model.lora is None)
    mine = ckpt.read_rank_state(tag_dir) or {}
    ckpt.set_rng_state(mine.get("rng", state["rng"]))  # this rank's generators (older checkpoints: rank 0's)
    r.kind.restore_rank_state(r.ctx, mine.get("rollout"))
    r.ctx.policy_updated()  # an engine with its own weights has the stage-start ones: synced before it samples
    r.start_step = r.done = state["step"]
    r.best_tag, r.best_eval = state.get("best_tag"), state.get("best_eval")
    r.bad_steps, r.elapsed_before = state.get("bad_steps", 0), state.get("stage_elapsed_s", 0.0)
    if r.stopper is not None and state.get("early_stopping"):
        r.stopper.load_state_dict(state["early_stopping"])


# ---- steps ---------------------------------------------------------------------------------------------------

def train_steps(r: StageRun) -> None:
    cfg, stage, ctx, name = r.cfg, r.stage, r.ctx, r.name
    probe, preemption = r.run["probe"], r.run["preemption"]
    if r.start_step == 0 and not cfg.eval.at_start and probe is not None and not probe.baseline:
        # no evaluation at the start, but Δlog p is measured from here: record the probes' baseline
        record_probe_baseline(cfg, ctx.generating, r.policy, r.run["processor"], probe)
    if r.start_step == 0 and cfg.eval.at_start:
        r.evaluate(0)
        r.keep_if_best(0, may_stop=False)  # the evaluation before any update never stops the stage
    scale = lr_scale(stage)
    bar = tqdm(range(r.start_step, stage.steps), desc=name, initial=r.start_step, total=stage.steps,
               disable=not is_main(), dynamic_ncols=True)
    ctx.timer.on_phase = lambda phase: bar.set_description_str(f"{name} [{phase}]")  # the bar says what runs now
    for step in bar:
        signal_if(f"{r.index}:{step}")
        _set_lr(r.optimizer, scale, step)
        r.policy.train()
        _reset_peak_memory()  # the step's own peak: not the evaluation's or checkpoint's before it, nor loading's
        ctx.timer.start()
        loss, metrics, skipped = _update(r, step)
        r.bad_steps = r.bad_steps + 1 if skipped else 0
        if r.bad_steps > cfg.run.max_bad_steps:
            raise BadStep(f"stage {name}: {r.bad_steps} updates in a row had a NaN/inf loss (run.max_bad_steps="
                          f"{cfg.run.max_bad_steps}); the last checkpoint holds the last good weights")
        r.done = done = step + 1
        rec = _step_record(r, loss, metrics, skipped)
        if skipped and is_main():
            tqdm.write(f"[{name}] step {done}: NaN/inf loss, update skipped ({r.bad_steps} in a row)")
        if done % cfg.run.log_every == 0:
            r.run["log"].write(rec)
        bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss", "reward", "entropy") if k in rec})
        if done % cfg.eval.every == 0 or done == stage.steps:
            r.evaluate(done)
            r.keep_if_best(done)
        # SIGTERM / SIGUSR1 on any rank, acted on at the next optimizer step: a checkpoint inside a gradient
        # accumulation would lose the gradients gathered so far (DeepSpeed saves none). A stage stopped early ends
        # now anyway (its hand-off saved); the run then stops at the stage boundary.
        at_boundary = done % cfg.deepspeed.grad_accum == 0
        preempted = at_boundary and preemption.requested() and done < stage.steps and not r.stopped_early
        if (done % cfg.run.checkpoint_every == 0 or preempted) and done < stage.steps and not r.stopped_early:
            r.save(f"step-{r.index}-{done}", done)
            ckpt.prune(r.run["ckpt_root"], keep_last=cfg.run.checkpoint_keep)
        if preempted:
            bar.close()
            raise Preempted(f"stage {name}: stopped after step {done} on a signal; checkpoint step-{r.index}-{done} "
                            "saved: run the same command to resume")
        if r.stopped_early:
            break
    bar.close()


def _update(r: StageRun, step: int):
    """One optimizer step: the Stage's step (rollouts happen in there, the engine awake for them only), then
    backward and DeepSpeed's step on each micro-batch's loss share as it comes. A NaN/inf loss on any rank skips
    the update on every rank. Returns (loss summed over the micro-batches, metrics, skipped)."""
    loss, metrics = 0.0, None
    # the fused ops check their inputs' values (host syncs) on the stage's first step only
    no_dropout = dropout_off(r.policy) if r.kind.trains_without_dropout else contextlib.nullcontext()
    with inputs_checked(step == r.start_step), no_dropout:
        out = r.kind.step(r.ctx, step)
        for k, (share, m) in enumerate([out] if isinstance(out, tuple) else out):  # one micro-batch at a time
            if not finite_everywhere(share):
                if k:  # earlier micro-batches' gradients are already in DeepSpeed's buffers
                    raise BadStep(f"stage {r.name} step {step + 1}: a NaN/inf loss in micro-batch {k + 1} after "
                                  f"{k} backward passes: the update cannot be skipped cleanly; the last "
                                  "checkpoint holds the last good weights")
                return loss, metrics, True
            # the optimizer steps after the last micro-batch (the one with the step's metrics) of every grad_accum-th
            # step: said to DeepSpeed, whose own count assumes as many micro-batches in every step (a token budget
            # makes them vary); DeepSpeed's set_gradient_accumulation_boundary is the documented way
            last = m is not None
            r.engine.set_gradient_accumulation_boundary(last and (step + 1) % r.cfg.deepspeed.grad_accum == 0)
            # the shares add up to the step's loss: DeepSpeed must not divide them by its accumulation count
            r.engine.backward(share / r.cfg.deepspeed.grad_accum, scale_wrt_gas=False)
            r.engine.step()  # the optimizer steps at the accumulation boundary only
            loss, metrics = loss + share.detach(), m if m is not None else metrics
    r.ctx.policy_updated()  # the engine (if it holds weights) syncs before it next samples: once per rollout
    return loss, metrics, False


def _step_record(r: StageRun, loss, metrics, skipped: bool) -> dict:
    """The step's line of metrics.jsonl: loss and metrics over all ranks, learning rate, phase times, throughput."""
    loss = float("nan") if skipped else mean_over_ranks(loss.float()).item()  # each rank's share of the loss
    timing = r.ctx.timer.stop()
    return {"stage": r.name, "stage_index": r.index, "step": r.done, "kind": "train", "loss": loss,
            **(_global_metrics(r.ctx, metrics) if not skipped else {"skipped": 1}),
            "lr": r.optimizer.param_groups[0]["lr"], **timing,
            **_throughput(r.ctx.extra.pop("tokens", 0), timing["step_time_s"])}


# ---- hand-off ------------------------------------------------------------------------------------------------

def hand_off(r: StageRun):
    """The weights the next stage starts from: the best checkpoint under early stopping, else the last weights;
    a done- marker records the stage finished (a resume skips it). Frees the stage's engines."""
    root, si = r.run["ckpt_root"], r.index
    final_tag = r.best_tag if (r.stopper is not None and r.best_tag) else f"final-{si}"
    if final_tag == f"final-{si}":
        r.save(final_tag, r.done)
    # the evaluation of the weights that go on (the best one under early stopping), and their step: where the next
    # stage starts
    best = final_tag == r.best_tag
    last_eval = {**((r.best_eval if best else r.last_eval) or {}),
                 "handoff_step": r.stopper.best_step if best else r.done}
    final_path = root / final_tag / "hf"
    if r.cfg.model.lora is not None and r.cfg.model.lora.handoff == "adapters":  # its base and these adapters go on
        final_path = final_path / ckpt.ADAPTER_DIR
    probe = r.run["probe"]
    ckpt.save(root, f"done-{si}", r.engine, r.policy, r.run["processor"], {
        "stage_index": si, "stage": r.name, "step": r.stage.steps, "tag": f"done-{si}", "stage_done": True,
        "next_stage_start": str(final_path), "stage_start": r.start_path, "timings": r.run["timings"],
        "results": {**r.run["results"], r.name: last_eval}, "probe_baseline": probe.baseline if probe else None,
        "world_size": r.world}, with_engine=False)  # the weights handed on are final_path's
    ckpt.prune(root, keep_last=0)
    _free_stage(r)
    return final_path, last_eval


def _free_stage(r: StageRun) -> None:
    """The stage's generation engines and DeepSpeed engines freed before the next stage builds its own (a
    colocated vLLM engine holds its share of the GPU until closed)."""
    import gc

    ctx = r.ctx
    for gen in (ctx.engine, ctx.extra.pop("teacher_engine", None)):
        if gen is not None:
            gen.close()
    ctx.engine = ctx.reference = ctx.teacher = ctx.model = None
    ctx.extra.clear()
    for ds in (r.engine, *r.frozen):
        ds.destroy()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---- what the loop uses -------------------------------------------------------------------------------------

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


def _reset_peak_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb() -> float:
    """The step's peak of the memory the caching allocator reserved on the GPU since _reset_peak_memory at the step's
    start (what the driver lends: an out-of-memory happens there, not at the allocated peak); the reset starts from
    what is reserved then, so blocks the allocator kept from an evaluation before the step still count. On the CPU
    the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_reserved() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _throughput(tokens: int, seconds: float) -> dict:
    """The world's tokens per second (every rank's tokens over the slowest rank's step) and the highest peak
    memory of any rank."""
    total = reduce_over_ranks(torch.tensor([float(tokens)], dtype=torch.float64)).item()
    slowest, peak = reduce_over_ranks(torch.tensor([seconds, _peak_memory_mb()], dtype=torch.float64), "max").tolist()
    return {"tokens_per_s": total / max(slowest, 1e-9), "peak_mem_mb": peak}


def _global_metrics(ctx, metrics: dict) -> dict:
    """The step's metrics over all ranks (ranks.global_means): a mean over tokens (or other items) weighted by each
    rank's count of them (the stage's metric_weights)."""
    mine = {k: float(_scalar(v)) for k, v in metrics.items() if k != "loss"}
    return global_means(mine, ctx.extra.pop("metric_weights", None))


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
            g_idx, g_real = shard(len(part), rank, size)
            s_idx, s_real = shard(m, rank, size)
            seeds = eval_seeds(seed, m)
            greedy, groups = eval_generations(engine, [part[i] for i in g_idx], [part[i] for i in s_idx],
                                              n_samples=e.n_samples, temperature=e.temperature,
                                              max_new_tokens=e.max_new_tokens, seeds=[seeds[i] for i in s_idx])
            gen[split] = (g_idx[:g_real], greedy[:g_real], m, s_idx, s_real, groups)  # the padding's dropped
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
    with eval_mode(model):
        probe(model, processor, [g[0].text for g in greedy])
