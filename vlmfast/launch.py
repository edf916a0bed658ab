"""Who this process is in the run's world, from whatever launched it: `deepspeed` and `torchrun` set RANK,
LOCAL_RANK and WORLD_SIZE; Slurm's `srun` sets SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS instead. Without this,
`srun python -m vlmfast.train` on N tasks would start N independent one-rank runs writing one directory."""

from __future__ import annotations

from .config import ConfigError


def srun_world(env) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE for a task `srun` started (none when a launcher already set RANK, or when
    there is one task). Refuses, naming the variables, a multi-task srun without MASTER_ADDR / MASTER_PORT (every
    task must reach rank 0's address)."""
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if "RANK" in env or tasks < 2 or "SLURM_PROCID" not in env:
        return {}
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"srun started {tasks} tasks but {' and '.join(missing)} {verb} not set: in the sbatch "
                          "script, export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) and "
                          "MASTER_PORT=29500 (docs/gpus.md, 'On several nodes')")
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": str(tasks)}
