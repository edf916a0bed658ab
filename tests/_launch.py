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


def two_rank_script(script: str, cwd, timeout=120) -> list:
    """`python -c script` as ranks 0 and 1 of one world (MASTER_* set, gloo): each rank's last stdout line, as JSON."""
    import json

    port, procs = free_port(), []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
