"""Where a study's runs execute (vlmfast/study_executors.py). On a machine with GPUs each running run holds its
own GPUs (CUDA_VISIBLE_DEVICES, disjoint; torchrun when it has several), driven here with a stand-in for the
processes; `study.executor: slurm` submits each run as a job through submitit, run here end to end through
submitit's local executor (the same submission, job folder, task environment and result)."""

import json
import subprocess
from pathlib import Path

import pytest
from test_study import RECIPE, REDUCED

from vlmfast.config import ConfigError
from vlmfast.study import load_study, plan, run_study
from vlmfast.study_executors import LocalExecutor, make_executor


class FakeProcess:
    running: list = []

    def __init__(self, cmd, env, **kw):
        self.cmd, self.env, self.code = cmd, env, None
        FakeProcess.running.append(self)

    def poll(self):
        return self.code


def test_local_runs_hold_disjoint_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    FakeProcess.running = []
    ex = LocalExecutor(workers=3, gpus_per_run=2, visible_gpus=[0, 1, 2, 3, 4])
    started = []
    while ex.can_start():
        started.append(ex.start(tmp_path / "r.yaml", {}, tmp_path / "log.txt"))
    assert len(started) == 2  # 5 GPUs hold two runs of 2, though 3 workers are allowed
    gpus = [p.env["CUDA_VISIBLE_DEVICES"] for p in FakeProcess.running]
    assert gpus == ["0,1", "2,3"]
    assert FakeProcess.running[0].cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    FakeProcess.running[0].code = 0  # the first run ends: its GPUs go back, a third run takes them
    assert ex.can_start()
    ex.start(tmp_path / "r.yaml", {}, tmp_path / "log.txt")
    assert FakeProcess.running[2].env["CUDA_VISIBLE_DEVICES"] == "4,0"
    assert not ex.can_start()
    one = make_executor({"workers": 2}, visible_gpus=[0, 1])  # default: a GPU a run
    one.start(tmp_path / "r.yaml", {}, tmp_path / "log.txt")
    assert FakeProcess.running[-1].env["CUDA_VISIBLE_DEVICES"] == "0" and "torch.distributed.run" not in \
        FakeProcess.running[-1].cmd
    cpu = make_executor({"workers": 2}, visible_gpus=[])
    cpu.start(tmp_path / "r.yaml", {}, tmp_path / "log.txt")
    assert "CUDA_VISIBLE_DEVICES" not in FakeProcess.running[-1].env


@pytest.mark.parametrize("setting,message", [
    ("study.executor=kubernetes", "study.executor: must be one of ['local', 'slurm']"),
    ("study.gpus_per_run=-1", "study.gpus_per_run: must be an integer >= 0"),
    ("study.slurm=4", "study.slurm: must be a mapping of submitit parameters"),
])
def test_bad_executor_settings_are_named(setting, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan(load_study(RECIPE, [setting]))


@pytest.mark.slow
def test_a_study_through_submitit_jobs(tmp_path, monkeypatch):
    """Submitted from a process an in-process run of the trainer left its world in (RANK, MASTER_PORT: a port its
    store still listens on): every job is a world of its own."""
    import socket

    raw = load_study(RECIPE, REDUCED + ["study.seeds=1", f"study.out_dir={tmp_path}", "study.executor=slurm",
                                        "study.slurm={cluster: local, timeout_min: 20}", "study.workers=3"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(busy.getsockname()[1]))):
            monkeypatch.setenv(k, v)
        report = run_study(raw, progress=False)
    assert report.exists()
    sdir = tmp_path / "tiny_study"
    runs = [p.parent for p in sdir.glob("**/study_recipe.yaml")]
    assert len(runs) == 2 + 4 + 5  # pretrain, teacher, 4 warm-starts, 5 Stage-2 runs
    for rd in runs:
        assert Path(json.loads((rd / "results.json").read_text())["final_model"]).is_dir(), rd
        assert "submitted as job" in (rd / "log.txt").read_text()
        assert list((rd / "slurm").glob("*_result.pkl")), rd  # submitit's own record of the job's result
