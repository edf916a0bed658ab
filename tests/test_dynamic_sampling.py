"""DAPO's dynamic sampling (vlmfast/stages/dynamic_sampling.py) in the trainer, with GSPO and two rewards, one from a
module outside vlmfast: groups whose rewards are all equal are dropped and more prompts sampled until the rollout is
full; the same groups, losses and metrics in one process and on two ZeRO-3 ranks."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from _launch import clean_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.timeout(900)]

# a reward that varies within a group for two question types of five, and is 0 for the rest: about 3 groups in 5
# have equal rewards, so a rollout of full groups takes more than one round
PARITY = '''
def parity(completion_ids, question_type, **_):
    return [float(ids[0] % 2) if ids and qt in ("count_all", "count_colour") else 0.0
            for ids, qt in zip(completion_ids, question_type)]
'''

RECIPE = {
    "run": {"threads": 1, "checkpoint_every": 100, "seed": 1},
    "model": {"path": "tiny:student"},
    "data": {"synthetic": {"train": 64, "val": 4, "ood": 4}},
    "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0,
             "at_start": False},
    "stages": [{"type": "grpo", "name": "grpo", "steps": 3, "lr": 2e-3, "batch_size": 4, "group_size": 4,
                "max_new_tokens": 6, "temperature": 1.5, "loss_type": "gspo", "dynamic_sampling": True,
                "max_sampling_rounds": 6,
                "rewards": [{"fn": "vlmfast.rewards:accuracy", "weight": 1.0}, {"fn": "user_rewards:parity",
                                                                              "weight": 1.0}]}],
}


def _run(tmp_path, name, ranks):
    path = tmp_path / f"{name}.yaml"
    deepspeed = {"zero_stage": 3, "stage3_param_persistence_threshold": 0} if ranks == 2 else {"zero_stage": 0}
    path.write_text(yaml.safe_dump({**RECIPE, "deepspeed": deepspeed,
                                    "run": {**RECIPE["run"], "name": name, "out_dir": str(tmp_path)}}))
    env = clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "vlmfast.train", "--config", str(path)]
    if ranks == 2:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), "--module", "vlmfast.train", "--config", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_dynamic_sampling_fills_the_batch_the_same_on_one_and_two_ranks(tmp_path):
    (tmp_path / "user_rewards.py").write_text(PARITY)
    one, two = _run(tmp_path, "one", 1), _run(tmp_path, "two", 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    assert any(r["sampling_rounds"] > 1 for r in one) and all(r["filtered_groups"] > 0 for r in one)
    for r in one:
        if r["sampling_rounds"] < 6:  # filled before the cap: every group's rewards differ
            assert r["unfilled_groups"] == 0
        assert 0 <= r["reward/parity"] <= 1 and r["reward"] == pytest.approx(
            r["reward/accuracy"] + r["reward/parity"], abs=1e-5)
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward/parity", "sampling_rounds", "filtered_groups", "unfilled_groups",
                    "ratio_mean", "entropy", "response_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
