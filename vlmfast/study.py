"""The warm-start study, vlmfast's main job: does the Stage-1 choice decide what Stage-2 RL can do?

    python -m vlmfast.study --config recipes/tiny_study.yaml [key=value ...]     (= make demo)

One recipe describes the whole study; each of its training runs is an ordinary `vlmfast.train` run
(its own directory, metrics.jsonl, checkpoints, resume) started as a subprocess:

    pretrain (optional)                  the student pretrained on perception, once: every warm-start's start
    teacher                              SFT of the larger model, once
    seed<k>/sft_early, sft_over, sft_gentle   Stage 1 from the same initial student weights, per seed
    seed<k>/opd                          Stage 1: on-policy distillation from the teacher    (after teacher)
    seed<k>/<warm-start>-<stage 2>       Stage 2 from that warm-start's final weights          (after it)

`study.seeds` (default 3) repeats every warm-start and Stage-2 run with run.seed = k. Runs whose inputs are
ready start side by side (`study.workers` at once), on this machine or as Slurm jobs (`study.executor`, see
vlmfast/study_executors.py: each run gets its own `study.gpus_per_run` GPUs); a killed study re-run with the
same recipe skips finished runs and resumes the interrupted ones from their checkpoints. At the end each seed's
report is written to runs/<name>/seed<k>/report.md and the study's, across seeds (verdicts with intervals), to
runs/<name>/report.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoint import write_atomic
from .config import ConfigError, apply_overrides, load_config, read_recipe
from .faults import Preempted, Preemption
from .study_executors import DIST_ENV

STUDY_KEYS = {"study", "base", "pretrain", "teacher", "stage1", "stage2"}
STUDY_SETTINGS = {"name", "out_dir", "workers", "seeds", "executor", "gpus_per_run", "slurm"}
STAGE1_RUNS = ("sft_early", "sft_over", "opd", "sft_gentle")
NODE_KEYS = {"stage", "model", "data", "eval", "run", "from"}
# relative cost of one step per stage type (measured on the tiny study: sampling dominates opd and grpo)
MAX_RESTARTS = 3  # a run preempted this many times in a row (exit 0, no results) counts as failed
STEP_COST = {"sft": 1.0, "sft_gentle": 2.0, "opd": 3.0, "grpo": 8.0, "dpo": 3.0, "cw_dpo": 3.0}
PLACEHOLDER_MODEL = "tiny:student"  # stands in for a checkpoint that does not exist yet, when validating


@dataclass
class Run:
    """One training run of the study: its recipe, and the runs whose weights it needs."""

    name: str
    raw: dict  # a vlmfast.train recipe (paths of other runs' weights filled in at launch)
    needs: list[str] = field(default_factory=list)
    start_from: str | None = None  # model.path <- this run's final weights
    teacher_from: str | None = None  # stages[0].teacher <- this run's final weights
    role: str = "stage1"  # pretrain | teacher | stage1 | stage2
    seed: int | None = None  # the study seed of a per-seed run (None: shared by every seed, the teacher)

    @property
    def arm(self) -> str:
        """The run's name within its seed: sft_early, sft_early-grpo, teacher."""
        return self.name.rsplit("/", 1)[-1]

    @property
    def steps(self) -> int:
        return sum(s["steps"] for s in self.raw["stages"])

    @property
    def cost(self) -> float:
        """Rough relative wall time (an SFT step = 1), for scheduling the longest chain first."""
        return sum(s["steps"] * STEP_COST.get("sft_gentle" if s.get("gentle") else s.get("type", "sft"), 1.0)
                   for s in self.raw["stages"])


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _node(raw_study: dict, where: str, node, name: str, out_dir: str, seed: int | None = None) -> dict:
    """The train recipe of one run: base <- the node's model/data/eval/run sections, one stage; `seed` sets
    run.seed (a study seed's runs, named seed<k>/<arm>), else the recipe's own. Every run shares out_dir, so
    one copy of the synthetic task (out_dir/.data) serves them all."""
    if not isinstance(node, dict) or "stage" not in node:
        raise ConfigError(f"{where}: expected a mapping with a `stage` (and optional model/eval/run)")
    unknown = set(node) - NODE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(NODE_KEYS)}")
    raw = _merge(raw_study.get("base") or {}, {k: node[k] for k in ("model", "data", "eval", "run") if k in node})
    raw.setdefault("run", {}).update(name=name if seed is None else f"{seed_dir(seed)}/{name}", out_dir=out_dir)
    if seed is not None:
        raw["run"]["seed"] = seed
    stage = dict(node["stage"])
    stage.setdefault("name", name.split("-")[-1])
    raw["stages"] = [stage]
    return raw


def seed_dir(seed: int) -> str:
    return f"seed{seed}"


def _check_executor(study: dict) -> None:
    from .study_executors import EXECUTORS

    executor = study.setdefault("executor", "local")
    if executor not in EXECUTORS:
        raise ConfigError(f"study.executor: must be one of {list(EXECUTORS)}, got {executor!r}")
    gpus = study.get("gpus_per_run")
    if gpus is not None and (not isinstance(gpus, int) or gpus < 0):
        raise ConfigError(f"study.gpus_per_run: must be an integer >= 0 (None: 1 when GPUs exist), got {gpus!r}")
    if not isinstance(study.get("slurm") or {}, dict):
        raise ConfigError(f"study.slurm: must be a mapping of submitit parameters, got {study['slurm']!r}")
    if executor == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ConfigError("study.executor: slurm submits the runs through submitit: pip install submitit") from None


def _seeds(value) -> list[int]:
    """study.seeds: a count n (seeds 0..n-1) or a list of distinct integer seeds."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    if (isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            and len(set(value)) == len(value)):
        return list(value)
    raise ConfigError(f"study.seeds: a count >= 1 or a list of distinct integers, got {value!r}")


def plan(raw_study: dict) -> tuple[dict, list[Run]]:
    """The study's settings and its runs, every recipe validated before anything starts."""
    unknown = set(raw_study) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; a study has {sorted(STUDY_KEYS)}")
    for section, value in raw_study.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping, got {type(value).__name__} {value!r}")
    study = {"name": "study", "out_dir": "runs", "workers": 2, "seeds": 3, **(raw_study.get("study") or {})}
    bad = set(study) - STUDY_SETTINGS
    if bad:
        raise ConfigError(f"study: unknown key(s) {sorted(bad)}; known: {sorted(STUDY_SETTINGS)}")
    if not isinstance(study["workers"], int) or study["workers"] < 1:
        raise ConfigError(f"study.workers: must be an integer >= 1, got {study['workers']!r}")
    _check_executor(study)
    study["seeds"] = _seeds(study["seeds"])
    out_dir = str(Path(study["out_dir"]) / study["name"])
    if Path(study["out_dir"]).exists() and not Path(study["out_dir"]).is_dir():
        raise ConfigError(f"study.out_dir: {study['out_dir']} is a file, not a folder")
    runs = []
    if "teacher" not in raw_study:
        raise ConfigError("teacher: the study trains a teacher for opd (a mapping with `stage`)")
    # the teacher (and the pretrained student, if any) are trained once and shared by every seed (their seed is
    # the base recipe's run.seed)
    teacher = Run("teacher", _node(raw_study, "teacher", raw_study["teacher"], "teacher", out_dir), role="teacher")
    runs.append(teacher)
    pretrain = "pretrain" in raw_study
    if pretrain:  # the student every warm-start starts from, as a pretrained VLM would be
        runs.append(Run("pretrain", _node(raw_study, "pretrain", raw_study["pretrain"], "pretrain", out_dir),
                        role="pretrain"))
    teacher_from = raw_study["teacher"].get("from") if isinstance(raw_study["teacher"], dict) else None
    if teacher_from is not None:  # teacher.from: pretrain — the teacher continues from the pretrained student
        if teacher_from != "pretrain" or not pretrain:
            raise ConfigError(f"teacher.from: a teacher can start only from `pretrain` (with a pretrain node in the "
                              f"recipe), got {teacher_from!r}")
        teacher.needs, teacher.start_from = ["pretrain"], "pretrain"
    stage1 = raw_study.get("stage1") or {}
    missing = [k for k in STAGE1_RUNS if k not in stage1]
    if missing or set(stage1) - set(STAGE1_RUNS):
        raise ConfigError(f"stage1: needs exactly the warm-starts {list(STAGE1_RUNS)}; missing {missing}, "
                          f"unknown {sorted(set(stage1) - set(STAGE1_RUNS))}")
    stage2 = raw_study.get("stage2") or {}
    for name, node in stage2.items():
        froms = node.get("from") if isinstance(node, dict) else None
        if not isinstance(froms, list) or not froms or set(froms) - set(STAGE1_RUNS):
            raise ConfigError(f"stage2.{name}.from: a list of warm-starts from {list(STAGE1_RUNS)}, got {froms!r}")
    for seed in study["seeds"]:  # every arm once per seed: run.seed <- seed, in out_dir/seed<k>/<run>
        sd = seed_dir(seed)
        for name in STAGE1_RUNS:
            r = Run(f"{sd}/{name}", _node(raw_study, f"stage1.{name}", stage1[name], name, out_dir, seed), seed=seed)
            if r.raw["stages"][0].get("type") == "opd":
                r.needs, r.teacher_from = ["teacher"], "teacher"
            if pretrain:
                r.needs, r.start_from = r.needs + ["pretrain"], "pretrain"
            runs.append(r)
        for name, node in stage2.items():
            for parent in node["from"]:
                run_name = f"{parent}-{name}"
                runs.append(Run(f"{sd}/{run_name}", _node(raw_study, f"stage2.{name}", node, run_name, out_dir, seed),
                                needs=[f"{sd}/{parent}"], start_from=f"{sd}/{parent}", role="stage2", seed=seed))
    for r in runs:  # validate each recipe now; weights of other runs are stand-ins until they exist
        trial = copy.deepcopy(r.raw)
        if r.start_from:
            trial.setdefault("model", {})["path"] = PLACEHOLDER_MODEL
        if r.teacher_from:
            trial["stages"][0]["teacher"] = "tiny:teacher"
        try:
            load_config(raw=trial)
        except ConfigError as e:
            raise ConfigError(f"run {r.name}: {e}") from None
    return {**study, "dir": out_dir}, runs


def final_model(run_dir: Path) -> str:
    return json.loads((run_dir / "results.json").read_text())["final_model"]


def _launch_recipe(run: Run, study_dir: Path) -> dict:
    raw = copy.deepcopy(run.raw)
    if run.start_from:
        raw.setdefault("model", {})["path"] = final_model(study_dir / run.start_from)
    if run.teacher_from:
        raw["stages"][0]["teacher"] = final_model(study_dir / run.teacher_from)
    return raw


def _inputs(run: Run, study_dir: Path) -> dict:
    """What a run's result depends on: its recipe and the results of the runs whose weights it uses
    (a parent that reran changes the weights at the same path)."""
    parents = {}
    for n in run.needs:
        res = study_dir / n / "results.json"
        parents[n] = hashlib.sha1(res.read_bytes()).hexdigest() if res.exists() else None
    return {"recipe": _launch_recipe(run, study_dir), "parents": parents}


def _same_inputs(run_dir: Path, inputs: dict) -> bool:
    stored = run_dir / "study_inputs.json"
    return stored.exists() and json.loads(stored.read_text()) == json.loads(json.dumps(inputs))


def _is_done(run: Run, study_dir: Path) -> bool:
    """Finished with these very inputs (a changed recipe or a rerun parent reruns it from scratch)."""
    rd = study_dir / run.name
    return (rd / "results.json").exists() and _same_inputs(rd, _inputs(run, study_dir))


def _progress_of(run_dir: Path) -> int:
    """Steps done so far, from the last line of metrics.jsonl (cheap to poll)."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="ignore").splitlines()
        for line in reversed(lines):
            if line.startswith("{"):
                try:
                    return int(json.loads(line)["step"])
                except (ValueError, KeyError):
                    continue
    except OSError:
        pass
    return 0


def environment() -> dict:
    """What produced the numbers: versions, machine, threads."""
    import torch
    import transformers

    from . import __version__

    env = {"vlmfast": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count()}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def run_study(raw_study: dict, *, progress: bool = True, visible_gpus: list[int] | None = None) -> Path:
    """Run (or finish) every run of the study, then write the report; returns report.md's path. `visible_gpus`:
    the GPUs runs may take (default: every GPU torch sees)."""
    from tqdm import tqdm

    from .study_executors import make_executor

    study, runs = plan(raw_study)
    if visible_gpus is None:
        import torch

        visible_gpus = list(range(torch.cuda.device_count()))
    executor = make_executor(study, visible_gpus)
    sdir = Path(study["dir"])
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "study.yaml").write_text(yaml.safe_dump(raw_study, sort_keys=False))
    by_name = {r.name: r for r in runs}
    chance = None
    cfg0 = load_config(raw=runs[0].raw)
    if cfg0.data.synthetic is not None:  # generated once here: runs starting side by side must not race
        from .data.loading import synthetic_paths
        from .study_report import chance_rates

        paths = synthetic_paths(cfg0)
        chance = chance_rates(paths["train"], paths["val"])
    done = {}
    found = True
    while found:  # until nothing more is found: a run is listed before the run it needs (teacher <- pretrain)
        found = False
        for r in runs:
            rd = sdir / r.name
            if r.name not in done and rd.exists() and all(n in done for n in r.needs) and _is_done(r, sdir):
                done[r.name] = json.loads((rd / "results.json").read_text()).get("wall_s", 0.0)
                found = True
    pending = [r for r in runs if r.name not in done]
    running: dict[str, tuple[object, float]] = {}  # name -> (the executor's handle, start time)
    failed: list[str] = []
    t_start = time.time()
    total = sum(r.steps for r in runs)
    bar = tqdm(total=total, desc=study["name"], unit="step", disable=not progress, dynamic_ncols=True,
               initial=sum(by_name[n].steps for n in done), mininterval=1.0)

    last_shown = None

    def ready(r):
        return all(n in done for n in r.needs)

    def chain(r) -> float:
        """Estimated cost from r's start to the end of the longest chain of runs that wait on it."""
        return r.cost + max((chain(o) for o in runs if r.name in o.needs), default=0)

    def priority(r):  # the longest remaining chain first (teacher -> opd -> opd-grpo before a lone run)
        return -chain(r)

    restarts = dict.fromkeys(by_name, 0)  # preempted runs restarted, in a row
    stopping = False
    with Preemption() as signalled:
        while pending or running:
            if signalled.signum is not None and not stopping:  # the study was signalled: so is every run
                stopping = True
                bar.write("  signal: stopping the running runs at their next step (each saves a checkpoint)")
                for handle, _ in running.values():
                    handle.stop()
            while executor.can_start() and not failed and not stopping:
                candidates = sorted((r for r in pending if ready(r)), key=priority)
                if not candidates:
                    break
                r = candidates[0]
                pending.remove(r)
                running[r.name] = (_start(r, sdir, executor), time.time())
            for name, (proc, t0) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                rd = sdir / name
                if code == 0 and not (rd / "results.json").exists():
                    # the trainer exits 0 when a signal stopped it at a checkpoint (a preemption): not finished
                    restarts[name] += 1
                    if stopping:
                        bar.write(f"  {name}: stopped at a checkpoint; it resumes there")
                    elif restarts[name] <= MAX_RESTARTS:
                        pending.append(by_name[name])
                        bar.write(f"  {name}: preempted; restarting it from its checkpoint")
                    else:
                        failed.append(name)
                        bar.write(f"  {name}: preempted {restarts[name]} times in a row; given up")
                elif code == 0:
                    wall = time.time() - t0
                    res = json.loads((rd / "results.json").read_text())
                    res["wall_s"] = wall
                    write_atomic(rd / "results.json", json.dumps(res, indent=1))
                    done[name] = wall
                    restarts[name] = 0
                    bar.write(f"  {name}: done in {wall:.0f} s  {_headline(res)}")
                elif stopping:  # torchrun exits non-zero on a SIGTERM, its workers after their checkpoint
                    bar.write(f"  {name}: stopped (exit {code}); it resumes from its last checkpoint")
                else:
                    failed.append(name)
                    bar.write(f"  {name}: FAILED (exit {code}); last lines of {sdir / name / 'log.txt'}:\n"
                              + _tail(sdir / name / "log.txt"))
            finished = sum(by_name[n].steps for n in done)
            live = {n: _progress_of(sdir / n) for n in running}
            shown = (min(total, finished + sum(live.values())), ", ".join(f"{n} {s}/{by_name[n].steps}"
                                                                          for n, s in live.items()))
            if shown != last_shown:  # redraw on change only: a log file gets a line per change, not per poll
                bar.n, last_shown = shown[0], shown
                bar.set_postfix_str(shown[1], refresh=False)
                bar.refresh()
            if (failed or stopping) and not running:
                break
            if not running and pending and not any(ready(r) for r in pending):
                break
            time.sleep(0.5)
    bar.close()
    if failed:
        raise RuntimeError(f"study runs failed: {failed}; their logs are in {sdir}/<run>/log.txt. "
                           "Re-run the same command to retry: finished runs are kept.")
    if stopping:
        raise Preempted(f"study stopped on a signal: {len(done)} of {len(runs)} runs finished, the others keep their "
                        "checkpoints; run the same command to resume")
    meta = {"environment": environment(), "wall_s_total": time.time() - t_start,
            "wall_s": {n: done[n] for n in by_name}, "chance": chance}
    return write_reports(sdir, raw_study, meta)


def write_reports(sdir: Path, raw_study: dict, meta: dict) -> Path:
    """Each seed's report (seed<k>/report.md: its runs and the shared teacher), then the study's report across
    seeds (report.md: every arm's mean and interval, each claim's verdict); returns the latter's path."""
    from .study_report import write_report
    from .study_verdicts import write_study_report

    study, runs = plan(raw_study)
    sdir = Path(sdir)
    per_seed = {}
    for seed in study["seeds"]:
        mine = [r for r in runs if r.seed == seed]
        paths = {"teacher": sdir / "teacher", **{r.arm: sdir / r.name for r in mine}}
        seed_meta = {**meta, "wall_s": {k: v for k, v in meta.get("wall_s", {}).items()
                                        if k == "teacher" or k.startswith(f"{seed_dir(seed)}/")}}
        write_report(sdir / seed_dir(seed), raw_study, paths, seed_meta, seed=seed)
        per_seed[seed] = paths
    return write_study_report(sdir, raw_study, per_seed, meta)


def _headline(res: dict) -> str:
    m = next(iter(res["results"].values()), None) or {}
    parts = [f"{k}={m[k]:.3f}" for k in ("val/accuracy", "ood/accuracy", "val/entropy") if k in m]
    return " ".join(parts)


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "    (no log)"


def _start(run: Run, sdir: Path, executor):
    rd = sdir / run.name
    inputs = _inputs(run, sdir)
    recipe = inputs["recipe"]
    if rd.exists() and not _same_inputs(rd, inputs):
        shutil.rmtree(rd)  # changed inputs: the old checkpoints would resume the wrong run
    rd.mkdir(parents=True, exist_ok=True)
    stored = rd / "study_recipe.yaml"
    stored.write_text(yaml.safe_dump(recipe, sort_keys=False))
    write_atomic(rd / "study_inputs.json", json.dumps(inputs, indent=1))
    threads = str(recipe.get("run", {}).get("threads", 1))
    # each run is its own one-process world: an inherited MASTER_PORT (from a launcher, or an earlier
    # run in this process) would make two runs started side by side fight over one port
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TQDM_MININTERVAL="5")
    return executor.start(stored, env, rd / "log.txt")


def load_study(path, overrides: list[str] | None = None) -> dict:
    raw = apply_overrides(read_recipe(path, "study recipe", "study, base, pretrain, ..."), overrides)
    plan(raw)  # validate now: a typo fails before any work
    return raw


# overrides each preset applies to the recipe before the command line's: `quick` is the recipe as shipped
# (make demo, ~20 minutes on 2 cores), `full` more seeds and larger evaluation splits for tighter intervals
PRESETS = {
    "quick": [],
    "full": ["study.name=tiny_study_full", "study.seeds=5", "base.data.synthetic.val=500",
             "base.data.synthetic.ood=500", "base.eval.num_problems=500", "base.eval.sample_problems=96"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vlmfast study", description="the warm-start study (see vlmfast/study.py)")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "recipes" / "tiny_study.yaml"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="quick: the recipe as shipped; full: " + " ".join(PRESETS["full"]))
    ap.add_argument("--report", metavar="STUDY_DIR", help="only re-render the reports of a study's run directories")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. stage1.sft_over.stage.steps=900 study.workers=1")
    args = ap.parse_args(argv)
    if args.report:
        d = Path(args.report)
        if not (d / "study.yaml").is_file():
            print(f"study error: {d} is not a study's directory (no study.yaml)", file=sys.stderr)
            return 2
        meta = json.loads((d / "report_meta.json").read_text()) if (d / "report_meta.json").exists() else {}
        print(write_reports(d, yaml.safe_load((d / "study.yaml").read_text()), meta))
        return 0
    try:
        raw = load_study(args.config, PRESETS[args.preset] + args.overrides)
    except ConfigError as e:
        print(f"study config error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_study(raw)
    except Preempted as e:  # as the trainer: a signal stopped it at checkpoints, and the same command resumes
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return 0
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
