"""Who a process is in the run's world: `srun` tasks (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS) join one world
instead of starting independent one-rank runs into one directory, or are refused by name without MASTER_ADDR /
MASTER_PORT; the process group's timeout is the recipe's `run.dist_timeout_s`."""

import subprocess
import sys

import pytest
import yaml
from _launch import clean_env, free_port

from vlmfast.config import ConfigError
from vlmfast.launch import srun_world


def test_srun_variables_name_the_rank():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}
    assert srun_world(env) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}
    assert srun_world({**env, "RANK": "3"}) == {}  # a launcher inside the allocation already said
    assert srun_world({**env, "SLURM_NTASKS": "1"}) == {}  # one task: a one-process run
    with pytest.raises(ConfigError, match="srun started 16 tasks but MASTER_ADDR and MASTER_PORT are not set"):
        srun_world({k: v for k, v in env.items() if not k.startswith("MASTER")})


def _recipe(tmp_path, batch_size):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "srun", "out_dir": str(tmp_path), "threads": 1},
        "data": {"synthetic": {"train": 16, "val": 2, "ood": 2}},
        "eval": {"at_start": False, "probes": 0, "num_problems": 2, "n_samples": 1, "k": [1]},
        "stages": [{"type": "sft", "steps": 1, "batch_size": batch_size}]}))
    return path


def test_two_srun_tasks_form_one_world(tmp_path):
    """Two tasks as srun starts them (no RANK): they join one 2-rank world, which the recipe's batch of 3 cannot
    split; both stop with exit 2 naming the 2 ranks (two independent runs would have trained)."""
    port, recipe = str(free_port()), _recipe(tmp_path, 3)
    procs = [subprocess.Popen([sys.executable, "-m", "vlmfast.train", "--config", str(recipe)],
                              env=clean_env(SLURM_NTASKS="2", SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert "batch_size=3 is not divisible by the 2 ranks" in err and "Traceback" not in err


def test_srun_without_a_master_address_is_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vlmfast.train", "--config", str(_recipe(tmp_path, 2))],
                         env=clean_env(SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "MASTER_ADDR and MASTER_PORT are not set" in res.stderr
    assert not (tmp_path / "srun").exists()


def test_the_process_group_timeout_is_the_recipes():
    code = ("import deepspeed, vlmfast.train as T\n"
            "deepspeed.init_distributed = lambda **kw: print(kw['timeout'].total_seconds())\n"
            "T._init_distributed('cpu', 42)\n")
    res = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "42.0", res.stderr[-2000:]


def test_each_rank_takes_its_gpu_whether_it_sees_the_node_or_one():
    from vlmfast.config import ConfigError
    from vlmfast.train import local_gpu

    assert [local_gpu(r, 8) for r in range(8)] == list(range(8))  # torchrun / deepspeed: every GPU of the node
    assert [local_gpu(r, 1) for r in range(8)] == [0] * 8  # srun --gpus-per-task=1: each task's own is cuda:0
    with pytest.raises(ConfigError, match="LOCAL_RANK=5 but this process sees 2 GPUs"):
        local_gpu(5, 2)


def test_flash_attention_only_where_the_forward_runs_in_16_bits(monkeypatch):
    import importlib.util

    from vlmfast.models import default_attn_implementation

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    assert default_attn_implementation("cuda", "bfloat16") == "flash_attention_2"
    assert default_attn_implementation("cuda", "float32") == "sdpa"  # flash-attn refuses fp32 at the first forward
    assert default_attn_implementation("cpu", "bfloat16") == "sdpa"
