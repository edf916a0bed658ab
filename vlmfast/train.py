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

from . import checkpoint as ckpt
from .config import (
    Config,
    ConfigError,
    changed_keys,
    check_installed,
    check_ranks,
    describe_keys,
    fingerprint,
    generation_engine,
    identity,
    load_config,
)
from .data.formats import RowError
from .data.loading import load_data, load_processor
from .data.prompts import reasoning_of, target_response
from .faults import BadStep, Preempted, Preemption
from .nodes import check_shared_out_dir, fetch_once_per_node
from .policy import load_policy
from .probes import DeltaLogpProbe
from .ranks import is_main as _is_main
from .rollout.vllm_engine import VLLMMemoryError
from .stage_loop import run_stage
from .tracking import open_trackers, record_key


def local_gpu(local_rank: int, visible: int) -> int:
    """This rank's GPU among the `visible` ones: LOCAL_RANK's where each rank sees the node's GPUs (torchrun,
    deepspeed, srun --gpus-per-node), the only one where the launcher binds a GPU per task (srun --gpus-per-task=1:
    each task sees its own as cuda:0, whatever its LOCAL_RANK)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES): give "
                          "each rank every GPU of its node, or exactly one")
    return local_rank


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
        keys = changed_keys(_as_read_now(made["recipe"]), identity(cfg))
        if not keys:  # made by an older vlmfast: the keys it did not have are at their defaults
            return
        raise ConfigError(f"run.name: {cfg.run_dir} was trained by another recipe (changed: {', '.join(keys)}); "
                          "resume with the same recipe, start over with run.resume=never, or pick a new run.name")


def _as_read_now(recipe: dict) -> dict:
    """A stored recipe as this vlmfast reads it: keys added since it was written take their defaults (a run made
    before an upgrade resumes after it). As stored when it no longer loads (a key since removed)."""
    try:
        return identity(load_config(raw=recipe))
    except ConfigError:
        return recipe


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
        torch.cuda.set_device(local_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))


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


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "results.json", "trackers.json")


def _set_aside_earlier_run(run_dir: Path) -> None:
    """run.resume: never starts over in a run dir that may hold an earlier run: its outputs move to
    replaced-<time>/ (a rename: nothing copied, nothing lost). Left in place, its step checkpoints would be pruned
    with the new run's (the newest by step, maybe the new run's own deleted) and `latest` would point into either."""
    earlier = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not earlier:
        return
    aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    aside.mkdir()
    for name in earlier:
        (run_dir / name).rename(aside / name)
    print(f"run.resume: never: the earlier run's {', '.join(earlier)} moved to {aside}", flush=True)


def keep_records(path: Path, keep_until: tuple[int, int]) -> set[tuple]:
    """Rewrite the JSON-lines file `path` with its records up to (stage_index, step) `keep_until`, the steps a resumed
    run replays after it dropped: each step then appears once. A torn last line (the kill came while it was written)
    is dropped; the file is replaced atomically (a kill now leaves the old file or the new one). Returns the dropped
    records' keys (tracking.record_key): the killed run sent those to its trackers already."""
    kept, dropped = [], set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut short
        if (rec.get("stage_index", -1), rec.get("step", 0)) <= keep_until:
            kept.append(line)
        else:
            dropped.add(record_key(rec))
    ckpt.write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsLog:
    """metrics.jsonl and the trackers of run.report_to (vlmfast.tracking), written by rank 0."""

    def __init__(self, cfg: Config, keep_until: tuple[int, int] | None):
        self.path = cfg.run_dir / "metrics.jsonl"
        self.trackers = []
        if not _is_main():
            return
        sent = set()  # the records past the checkpoint that the killed run logged: its trackers have them
        for path in (self.path, cfg.run_dir / "samples.jsonl"):  # resume: the records up to its checkpoint
            if keep_until is not None and path.exists():
                dropped = keep_records(path, keep_until)
                if path == self.path:
                    sent = dropped
            elif keep_until is None and path.exists():
                path.unlink()
        self.trackers = open_trackers(cfg.run.report_to, cfg.run_dir, cfg.run.name, cfg.to_dict(),
                                      resume_at=keep_until, sent=sent)

    def write(self, record: dict) -> None:
        if not _is_main():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)


def fit_to_gpu(cfg: Config, longest: int, *, gpus: int, gpu_memory: int) -> dict:
    """Before any model loads on GPUs: the stages without micro-batch settings (and whose loss may be split) get the
    largest token budget that fits (`vlmfast plan`'s, said on stdout), then a stage that cannot fit stops the run
    naming its largest component; prompts priced at the data's longest. Returns the budgets set ({stage index:
    tokens})."""
    from .plan import check_fits, token_budgets

    budgets = token_budgets(cfg, gpus=gpus, gpu_memory=gpu_memory, prompt_tokens=longest)
    for i, tokens in budgets.items():
        cfg.stages[i].max_tokens_per_micro_batch = tokens
        if _is_main():
            print(f"stages[{i}].max_tokens_per_micro_batch={tokens}: the largest token budget that fits "
                  f"{gpu_memory / 2**30:.0f} GiB (vlmfast plan); set it or micro_batch_size to choose", flush=True)
    check_fits(cfg, gpus=gpus, gpu_memory=gpu_memory, prompt_tokens=longest)
    return budgets


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
    check_installed(cfg)
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
    made_by = {"fingerprint": fingerprint(cfg), "recipe": identity(cfg)}  # the recipe as given, not as fitted
    as_given = cfg.to_dict()
    if device == "cuda":  # a recipe that cannot fit stops here, naming what does not, before any model loads
        if longest is None:  # no vLLM stage: the prompts were not counted yet
            from .data.budget import longest_prompt

            processor = load_processor(cfg)
            longest = longest_prompt(processor, data)
        fit_to_gpu(cfg, longest, gpus=torch.distributed.get_world_size(),
                   gpu_memory=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.run.resume == "never":
            _set_aside_earlier_run(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(as_given, sort_keys=False))
        (run_dir / RECIPE_FILE).write_text(json.dumps(made_by, default=str))
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
        shared = {"data": data, "log": log, "ckpt_root": ckpt_root, "probe": probe, "timings": timings,
                  "results": results, "preemption": preemption}
        for si in range(start_stage, len(cfg.stages)):
            stage = cfg.stages[si]
            name = stage.name or f"{si}-{stage.type}"
            resuming = state is not None and si == state["stage_index"] and not state.get("stage_done")
            if state is not None and si == state["stage_index"] and state.get("stage_done"):
                policy_path = state["next_stage_start"]
                continue
            ckpt.seed_rngs(cfg.run.seed * 1_000_003 + si)  # a resume then restores the checkpoint's generators
            model, processor = load_policy(cfg, policy_path, device, processor)
            t0 = time.time()
            final_path, metrics = run_stage(cfg, si, name, stage, model, {**shared, "processor": processor},
                                            policy_path, state if resuming else None, max_model_len=max_model_len)
            before = state.get("stage_elapsed_s", 0.0) if resuming else 0.0  # the stage's time up to its checkpoint
            timings[name] = timings.get(name, 0.0) + before + time.time() - t0
            results[name] = metrics
            policy_path = str(final_path)
            state = None
            if si + 1 < len(cfg.stages) and preemption.requested():  # the signal came during the stage's last step
                raise Preempted(f"stopped after stage {name} on a signal: run the same command to resume")
    ckpt.finish_deletions()
    if _is_main():
        ckpt.write_atomic(run_dir / "results.json", json.dumps({"results": results, "timings_s": timings,
                                                                "final_model": policy_path}, indent=1))
        print(f"done: results in {run_dir / 'results.json'}, final model {policy_path}", flush=True)
    return results


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
