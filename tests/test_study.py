"""The warm-start study (the main job): its plan, a reduced study end to end (killed, then resumed),
and the report's table, figures and summary holding finite numbers."""

import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vlmfast.config import ConfigError
from vlmfast.study import STAGE1_RUNS, load_study, plan, run_study

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_study.yaml"

# a few steps of everything: the pipeline, not the learning (the recipe's numbers are calibrated in docs/study.md)
REDUCED = [
    "teacher.stage.steps=4", "stage1.sft_early.stage.steps=4", "stage1.sft_over.stage.steps=6",
    "stage1.opd.stage.steps=3", "stage1.sft_gentle.stage.steps=3", "stage2.grpo.stage.steps=2",
    "stage2.grpo.stage.batch_size=2", "stage2.grpo.stage.group_size=2", "stage2.cw_dpo.stage.steps=2",
    "stage2.dpo.stage.steps=2", "base.eval.every=2", "stage2.grpo.eval.every=2", "stage2.cw_dpo.eval.every=2",
    "stage2.dpo.eval.every=2", "base.eval.num_problems=4", "base.eval.n_samples=2", "base.eval.k=[1, 2]",
    "base.eval.max_new_tokens=8", "base.eval.probes=2", "base.data.synthetic.train=32", "base.data.synthetic.val=8",
    "base.data.synthetic.ood=8", "base.run.checkpoint_every=2", "base.eval.sample_problems=4",
    "pretrain.stage.steps=3", "pretrain.eval.every=2", "pretrain.eval.num_problems=4",
    "stage1.sft_early.eval.every=2", "stage1.sft_over.eval.every=2",
]


def test_plan_has_every_run_and_its_dependencies():
    study, runs = plan(yaml.safe_load(RECIPE.read_text()))
    assert study["seeds"] == [0, 1, 2]  # at least three seeds by default
    names = [r.name for r in runs]
    assert names[:2] == ["teacher", "pretrain"]  # each trained once, shared by the seeds
    per_seed = {"sft_early", "sft_over", "opd", "sft_gentle", "sft_early-grpo", "sft_over-grpo", "opd-grpo",
                "sft_gentle-cw_dpo", "sft_gentle-dpo"}
    for seed in (0, 1, 2):
        assert {n.split("/")[1] for n in names if n.startswith(f"seed{seed}/")} == per_seed
    by = {r.name: r for r in runs}
    assert by["seed1/opd"].needs == ["teacher", "pretrain"] and by["seed1/opd"].teacher_from == "teacher"
    # every warm-start of every seed starts from the pretrained student
    assert all(by[f"seed{s}/{n}"].start_from == "pretrain" for s in (0, 1, 2) for n in STAGE1_RUNS)
    assert by["seed2/sft_gentle-dpo"].start_from == "seed2/sft_gentle"
    # each seed's runs carry its seed
    for seed in (0, 1, 2):
        assert {by[f"seed{seed}/{n}"].raw["run"]["seed"] for n in STAGE1_RUNS} == {seed}
        assert by[f"seed{seed}/sft_over-grpo"].raw["run"]["name"] == f"seed{seed}/sft_over-grpo"
    # the teacher continues from the pretrained student (teacher.from: pretrain)
    assert by["teacher"].start_from == "pretrain" and by["teacher"].needs == ["pretrain"]


@pytest.mark.parametrize("override, message", [
    ("stage1.sft_erly={}", "stage1: needs exactly"),
    ("stage2.grpo.from=[sft_late]", "stage2.grpo.from"),
    ("stage1.sft_over.stage.stepz=3", "run seed0/sft_over: stages\\[0\\]: unknown key"),
    ("study.workerz=2", "study: unknown key"),
    ("base.eval.k=[1, 9]", "eval.k"),
    ("study.seeds=0", "study.seeds: a count"),
    ("study.seeds=[1, 1]", "study.seeds: a count"),
])
def test_bad_study_recipes_fail_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_study(RECIPE, [override, f"study.out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def _finite_cells(table: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.\d+", table)]


@pytest.mark.slow
def test_reduced_study_end_to_end_killed_then_resumed(tmp_path, monkeypatch):
    raw = load_study(RECIPE, REDUCED + ["study.seeds=2", f"study.out_dir={tmp_path}"])
    sdir = tmp_path / "tiny_study"
    # as left behind by a one-process run in this process (or a launcher): runs must not inherit them
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        monkeypatch.setenv(k, v)
    # a kill at step 3 of every run's stage: the study stops, naming the failed runs, and starts no dependent
    monkeypatch.setenv("VLMFAST_FAIL_AT_STEP", "0:3")
    with pytest.raises(RuntimeError, match="study runs failed"):
        run_study(raw, progress=False)
    assert not (sdir / "seed0" / "sft_early-grpo").exists()
    monkeypatch.delenv("VLMFAST_FAIL_AT_STEP")
    report = run_study(raw, progress=False)  # the same command again: resumes and finishes
    assert report == sdir / "report.md"

    # every run finished, the teacher once, the rest once per seed; a resumed run's metrics hold each step once
    arms = (*STAGE1_RUNS, "sft_early-grpo", "sft_over-grpo", "opd-grpo", "sft_gentle-cw_dpo", "sft_gentle-dpo")
    names = ["pretrain", "teacher"] + [f"seed{s}/{n}" for s in (0, 1) for n in arms]
    for name in names:
        res = json.loads((sdir / name / "results.json").read_text())
        assert Path(res["final_model"]).is_dir(), name
        steps = [json.loads(line)["step"] for line in (sdir / name / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == sorted(set(steps)), name
    assert json.loads((sdir / "seed1" / "sft_over" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
    opd = yaml.safe_load((sdir / "seed1" / "opd" / "study_recipe.yaml").read_text())
    assert opd["run"]["seed"] == 1 and opd["stages"][0]["teacher"].startswith(str(sdir / "teacher"))
    # every warm-start of every seed starts from the one pretrained student
    pretrained = json.loads((sdir / "pretrain" / "results.json").read_text())["final_model"]
    for s in (0, 1):
        for n in STAGE1_RUNS:
            recipe = yaml.safe_load((sdir / f"seed{s}" / n / "study_recipe.yaml").read_text())
            assert recipe["model"]["path"] == pretrained

    # each seed's report: a row per model, Stage-1 -> Stage-2 cells, finite numbers in range
    text = (sdir / "seed0" / "report.md").read_text()
    table = text.split("## pass@k")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "sft_early → grpo", "sft_over → grpo",
                                                       "opd → grpo", "sft_gentle → cw_dpo", "sft_gentle → dpo"]
    for r in rows[1:]:
        assert r.count("→") >= 6  # every metric at both endpoints
    nums = _finite_cells("\n".join(rows))
    assert nums and all(math.isfinite(x) for x in nums)
    accs = [float(x) for r in rows for x in re.findall(r"(\d\.\d{3})", r.split("|")[2])]
    assert all(0.0 <= a <= 1.0 for a in accs)
    # figures exist, are PNGs, and the report links them
    for fig in ("entropy.png", "reward_accuracy.png", "dlogp.png", "pass_at_k.png", "cooling_weight.png"):
        data = (sdir / "seed0" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, fig
        assert f"]({fig})" in text
    assert "## Summary" in text and "Entropy at RL entry" in text and "out of domain" in text
    assert "torch" in text and "seeds: run seed 0 (the teacher's: 0)" in text and "wall time per run" in text
    assert yaml.safe_load((sdir / "study.yaml").read_text()) == raw

    # the study's report across seeds: every arm with its interval, every claim with a verdict
    text = report.read_text()
    assert "2 seeds" in text and "[seed 1](seed1/report.md)" in text
    verdicts = json.loads((sdir / "verdicts.json").read_text())
    assert len(verdicts) == 5 and all(v["verdict"] in ("holds", "contradicted", "inside the noise") for v in verdicts)
    assert all(set(v["values"]) == {"0", "1"} for v in verdicts)  # computable in every seed
    for v in verdicts:
        assert f"**{v['verdict']}**" in text
    assert "sft_early (Stage 1) | " in text and "sft_gentle → dpo | " in text and "## Stage 2 at its plateau?" in text
    assert (sdir / "seeds.png").read_bytes()[:4] == b"\x89PNG"

    # a third call finds everything done: no run starts again
    def mtimes():
        return {str(p.parent.relative_to(sdir)): p.stat().st_mtime for p in sdir.glob("**/metrics.jsonl")}

    before = mtimes()
    run_study(raw, progress=False)
    assert mtimes() == before
    from vlmfast.study import main as study_main

    (sdir / "report.md").unlink()
    assert study_main(["--report", str(sdir)]) == 0 and (sdir / "report.md").exists()  # re-rendered from the runs
    # a changed warm-start reruns it and the Stage-2 run built on its weights, in every seed, nothing else
    raw["stage1"]["opd"]["stage"]["lr"] = 5e-4
    run_study(raw, progress=False)
    now = mtimes()
    assert {n for n in now if now[n] != before[n]} == {f"seed{s}/{n}" for s in (0, 1) for n in ("opd", "opd-grpo")}


def test_presets_are_valid_recipes_and_the_command_line_comes_last(tmp_path, capsys):
    from vlmfast.study import PRESETS, main

    study, runs = plan(load_study(RECIPE, PRESETS["full"]))
    assert study["seeds"] == [0, 1, 2, 3, 4] and study["name"] == "tiny_study_full"
    assert runs[-1].raw["data"]["synthetic"]["val"] == 500 and runs[-1].raw["eval"]["num_problems"] == 500
    # a bad key after the preset: exit 2, the key named, nothing run
    assert main(["--preset", "full", "study.seedz=3", f"study.out_dir={tmp_path}"]) == 2
    assert "unknown key(s) ['seedz']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_study_mistakes_exit_2_naming_them(tmp_path, capsys):
    """A broken override, a section that is not a mapping, an out_dir that is a file, a report of a folder that
    holds no study: exit 2, one line, no traceback."""
    from vlmfast.study import main

    (tmp_path / "file").write_text("x")
    for args, says in ((["study.seeds=[1"], "override 'study.seeds=[1': not a YAML value"),
                       (["study.seeds.x=1"], "override 'study.seeds.x=1'"),
                       (["base=5"], "base: expected a mapping, got int 5"),
                       (["stage2=[1]"], "stage2: expected a mapping, got list"),
                       ([f"study.out_dir={tmp_path / 'file'}"], "study.out_dir: "),
                       (["--report", str(tmp_path)], "is not a study's directory")):
        assert main(args) == 2, args
        assert says in capsys.readouterr().err, args


class _Preemptible:
    """A stand-in for the study's executor (study_executors' interface), one run at a time: each run's process ends
    as `outcome(name, start)` says: "preempted" (exit 0 without results.json: how the trainer stops at a checkpoint
    on a signal), "finished" (results.json written), or "signal the study" (the study process gets SIGTERM while
    the run is running, and the run stops at a checkpoint when the study stops it)."""

    def __init__(self, outcome, sdir):
        self.outcome, self.sdir, self.starts, self.stopped, self.current = outcome, sdir, [], [], None

    def can_start(self):
        return self.current is None

    def start(self, config, env, log_path):
        rd = Path(config).parent
        name = rd.relative_to(self.sdir).as_posix()  # the run's name in the study (seed0/opd)
        self.starts.append(name)
        executor = self

        class Run:
            def __init__(self):
                self.stopped = False
                self.result = executor.outcome(name, executor.starts.count(name))

            def poll(self):
                if self.result == "signal the study" and not self.stopped:
                    import os
                    import signal

                    os.kill(os.getpid(), signal.SIGTERM)  # the study's Preemption handler sets its flag
                    return None
                if self.result == "finished":
                    (rd / "final").mkdir(exist_ok=True)
                    (rd / "results.json").write_text(json.dumps({"results": {}, "final_model": str(rd / "final")}))
                executor.current = None
                return 0

            def stop(self):
                self.stopped = True
                executor.stopped.append(name)

            def kill(self):
                pass

        self.current = Run()
        return self.current


@pytest.fixture
def small_study(tmp_path, monkeypatch):
    import vlmfast.study as S
    import vlmfast.study_executors as E

    raw = load_study(RECIPE, REDUCED + [f"study.out_dir={tmp_path}", "study.workers=1"])
    monkeypatch.setattr(S, "write_reports", lambda sdir, raw_study, meta: Path(sdir) / "report.md")
    monkeypatch.setattr(S, "time", SimpleNamespace(time=time.time, sleep=lambda s: None))  # no wait between polls

    def with_executor(outcome):
        executor = _Preemptible(outcome, tmp_path / "tiny_study")
        monkeypatch.setattr(E, "make_executor", lambda study, gpus: executor)
        return executor

    return raw, with_executor


def test_a_preempted_run_restarts_from_its_checkpoint(small_study):
    """A run that exits 0 without results (the trainer stopped on a signal at a checkpoint: a preemption) is not
    finished: it starts again (resuming there), then its dependents; every run preempted once finishes the study."""
    raw, with_executor = small_study
    executor = with_executor(lambda name, start: "preempted" if start == 1 else "finished")
    run_study(raw, progress=False, visible_gpus=[])
    runs = plan(raw)[1]
    assert sorted(executor.starts) == sorted([r.name for r in runs] * 2)
    for r in runs:  # a run starts only once what it needs has finished: after their second start
        for needed in r.needs:
            second = len(executor.starts) - 1 - executor.starts[::-1].index(needed)
            assert executor.starts.index(r.name) > second, (r.name, needed)


def test_a_run_preempted_again_and_again_fails_without_its_dependents(small_study):
    from vlmfast.study import MAX_RESTARTS

    raw, with_executor = small_study
    executor = with_executor(lambda name, start: "preempted")
    with pytest.raises(RuntimeError, match=r"study runs failed: \['pretrain'\]"):
        run_study(raw, progress=False, visible_gpus=[])
    assert executor.starts == ["pretrain"] * (MAX_RESTARTS + 1)


def test_a_signalled_study_stops_its_runs_at_a_checkpoint_and_starts_no_more(small_study):
    from vlmfast.faults import Preempted

    raw, with_executor = small_study
    executor = with_executor(lambda name, start: "signal the study" if name == "teacher" else "finished")
    with pytest.raises(Preempted, match="run the same command to resume"):
        run_study(raw, progress=False, visible_gpus=[])
    assert executor.stopped == ["teacher"] and executor.starts[-1] == "teacher"  # nothing started after the signal
    assert not (Path(raw["study"]["out_dir"]) / "tiny_study" / "teacher" / "results.json").exists()
