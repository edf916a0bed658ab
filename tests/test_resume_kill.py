"""A run killed by SIGKILL (no exception handler, no atexit, as the OOM killer or a preempted job stops it)
anywhere resumes to exactly the metrics of the uninterrupted run: inside a rollout batch (its sampled
tokens, rewards and old/reference log-probs come from the checkpoint: the policy that sampled them is
gone), at a rollout boundary, and in the middle of an evaluation; a record the kill cut short is dropped, and the
evaluation samples of replayed steps appear once."""

import json
import signal
import subprocess
import sys

import pytest
import yaml
from _launch import clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RECIPE = {
    "run": {"threads": 2, "checkpoint_every": 1},
    "model": {"path": "tiny:student"},
    "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
    "eval": {"every": 2, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 2},
    "stages": [{"type": "grpo", "name": "grpo", "steps": 4, "lr": 2e-3, "batch_size": 2, "group_size": 4,
                "updates_per_rollout": 2, "max_new_tokens": 6, "kl_coef": 0.05, "entropy_coef": 0.05}],
}


def train(tmp_path, name, env=None, recipe=RECIPE, **run):
    """`recipe` through `python -m vlmfast.train` (run keys overridden by `run`), with `env` added."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**recipe, "run": {**recipe["run"], "name": name, "out_dir": str(tmp_path),
                                                      **run}}))
    return subprocess.run([sys.executable, "-m", "vlmfast.train", "--config", str(path)], capture_output=True,
                          text=True, timeout=600, env=clean_env(**(env or {})))


def _train(tmp_path, name, kill_at=None):
    return train(tmp_path, name, {"VLMFAST_KILL_AT": kill_at} if kill_at else None)


def records(tmp_path, name, file="metrics.jsonl"):
    return [json.loads(line) for line in (tmp_path / name / file).read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    res = _train(tmp, "whole")
    assert res.returncode == 0, res.stderr[-3000:]
    return records(tmp, "whole"), records(tmp, "whole", "samples.jsonl")


# step 1 and 3: inside a rollout batch of 2 updates; step 2: at its boundary; eval:2: mid-evaluation
@pytest.mark.parametrize("kill_at", ["0:1", "0:2", "0:3", "0:eval:2"])
def test_sigkill_anywhere_resumes_to_the_same_metrics(whole, tmp_path, kill_at):
    whole, whole_samples = whole
    killed = _train(tmp_path, "run", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    for file in ("metrics.jsonl", "samples.jsonl"):  # as a kill in the middle of writing a record leaves them
        with (tmp_path / "run" / file).open("a") as f:
            f.write('{"stage": "grpo", "stage_index": 0, "st')
    resumed = _train(tmp_path, "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # every evaluation's samples once (those of an evaluation replayed after the kill too), as the whole run's
    assert records(tmp_path, "run", "samples.jsonl") == whole_samples
    got = records(tmp_path, "run")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in whole]
    for a, b in zip(whole, got):
        for key in ("loss", "ratio_mean", "kl", "sampler_mismatch", "val/accuracy", "val/entropy", "dlogp_pos"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (kill_at, a["kind"], a["step"], key)
