"""The `deepspeed` launcher with 2 CPU ranks (gloo) under ZeRO-2 and ZeRO-3: SFT, then GRPO from its
checkpoint, end with the same weights as one process on the same global batch. Rollouts are seeded
per prompt by its place in the global batch, so 2 ranks sample what 1 process samples. GRPO uses the
per-sequence mean here: DeepSpeed averages per-rank losses, and a mean of per-rank token means is not
the global token mean when ranks hold different token counts (SFT's token mean differs only in the
last digits: its target responses have nearly equal lengths)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGES = [{"type": "sft", "name": "sft", "steps": 4, "lr": 2e-3, "batch_size": 8},
          {"type": "grpo", "name": "grpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "group_size": 4,
           "max_new_tokens": 6, "entropy_coef": 0.05,  # the entropy bonus moves even a zero-reward policy
           "aggregation": "seq-mean-token-mean"}]  # a mean of per-rank means is the global mean


def _recipe(tmp_path, name, zero):
    raw = {"run": {"name": name, "out_dir": str(tmp_path), "threads": 1, "checkpoint_every": 100},
           "model": {"path": "tiny:student"}, "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
           "deepspeed": {"zero_stage": zero},
           "eval": {"every": 1000, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0,
                    "at_start": False},
           "stages": STAGES}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE")


def _clean_env(**extra):
    """The environment without the one-rank world an in-process run of the trainer left behind."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


def _weights(tmp_path, name, stage):
    from vlmfast.models import load_model

    return load_model(str(tmp_path / name / "checkpoints" / f"final-{stage}" / "hf"))[0].state_dict()


def _relative_update_gap(a, b, init):
    """|update_a - update_b| / |update_a| over all parameters."""
    u1 = torch.cat([(a[k] - init[k]).flatten() for k in init])
    u2 = torch.cat([(b[k] - init[k]).flatten() for k in init])
    assert u1.norm() > 0  # the weights did move
    return ((u1 - u2).norm() / u1.norm()).item()


def _grpo_records(tmp_path, name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == "grpo" and r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    res = subprocess.run([sys.executable, "-m", "vlmfast.train", "--config", str(_recipe(tmp, "one", 0))],
                         capture_output=True, text=True, timeout=600, env=_clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return _weights(tmp, "one", 0), _weights(tmp, "one", 1)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_match_one_process(single, tmp_path, zero):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "vlmfast.train", "--config", str(_recipe(tmp_path, "two", zero))]
    env = _clean_env(DS_ACCELERATOR="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=800, env=env)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    sft_one, grpo_one = single
    sft_two, grpo_two = _weights(tmp_path, "two", 0), _weights(tmp_path, "two", 1)
    from vlmfast.models import tiny_vlm

    init = tiny_vlm("student", seed=0)[0].state_dict()
    assert _relative_update_gap(sft_one, sft_two, init) < 1e-3
    # GRPO's own update (from the SFT weights), compared the same way
    assert _relative_update_gap(grpo_one, grpo_two, sft_one) < 1e-3
    grpo = _grpo_records(tmp_path, "two")
    assert [r["step"] for r in grpo] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and 0 <= r["reward"] <= 1 for r in grpo)
