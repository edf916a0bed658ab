"""Launching the trainer as users do, from tests: one process, or 2 CPU ranks through the `deepspeed`
launcher (gloo), in a clean environment."""

import os
import socket
import subprocess
import sys

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE")


def clean_env(**extra):
    """The environment without the one-rank world an in-process run of the trainer left behind."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_one_process(config, *overrides, timeout=600):
    res = subprocess.run([sys.executable, "-m", "vlmfast.train", "--config", str(config), *overrides],
                         capture_output=True, text=True, timeout=timeout, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def train_two_ranks(config, *overrides, timeout=800):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "vlmfast.train", "--config", str(config), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(DS_ACCELERATOR="cpu"))
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res
