"""Where a study's runs execute (`study.executor`):

- `local`: processes on this machine, `study.workers` at once. With GPUs each run gets `study.gpus_per_run` of
  them (default 1), disjoint from every other running run's (CUDA_VISIBLE_DEVICES), launched with torchrun when it
  has several; without GPUs, one-process runs as before.
- `slurm`: each run a Slurm job through submitit (`study.slurm`: submitit's parameters, e.g. slurm_partition,
  timeout_min, cpus_per_task, mem_gb; `cluster: local` runs the jobs through submitit's local executor, as the
  tests do): one node, a task per GPU; in the job, the task's rank and the job's first host become the trainer's
  RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR. The job's files are in <study>/<run>/slurm/.

Either returns a handle per run with `poll()` (None while it runs, then its exit code), `stop()` (a checkpoint,
then exit: the study was signalled) and `kill()`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

EXECUTORS = ("local", "slurm")
# a process group's environment: a run is a world of its own, never the submitting process's (an in-process run
# of the trainer leaves these set, its TCP store still listening on MASTER_PORT)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train_command(config: Path, gpus: int) -> list[str]:
    """`vlmfast.train` on `config`: one process, or torchrun with a rank per GPU."""
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "-m", "vlmfast.train", "--config", str(config)]
    return [sys.executable, "-m", "vlmfast.train", "--config", str(config)]


class _LocalRun:
    def __init__(self, proc: subprocess.Popen, gpus: list[int], pool: list[int]):
        self.proc, self.gpus, self.pool = proc, gpus, pool

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and self.gpus:
            self.pool.extend(self.gpus)  # its GPUs go back to the pool once
            self.gpus = []
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.poll()

    def stop(self) -> None:
        """SIGTERM: the trainer finishes its step, saves a checkpoint and exits 0 (torchrun passes it on to its
        workers, and then exits non-zero itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


class LocalExecutor:
    """`workers` runs at once; with `visible_gpus` (the machine's GPU indices) each run takes `gpus_per_run` free
    ones, so two runs never share a GPU."""

    def __init__(self, workers: int, gpus_per_run: int, visible_gpus: list[int]):
        self.workers, self.gpus_per_run, self.free = workers, gpus_per_run, list(visible_gpus)
        self.running: list[_LocalRun] = []

    def can_start(self) -> bool:
        self.running = [r for r in self.running if r.poll() is None]
        return len(self.running) < self.workers and len(self.free) >= self.gpus_per_run

    def start(self, config: Path, env: dict, log_path: Path) -> _LocalRun:
        gpus, self.free[:] = self.free[: self.gpus_per_run], self.free[self.gpus_per_run:]
        env = dict(env)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        with Path(log_path).open("a") as log:
            proc = subprocess.Popen(train_command(config, len(gpus)), stdout=log, stderr=subprocess.STDOUT, env=env)
        run = _LocalRun(proc, gpus, self.free)
        self.running.append(run)
        return run


def train_job(config: str, env: dict) -> int:
    """A study run inside a submitit job, on every task: the job's world as the trainer reads it, then the run."""
    import submitit

    for key in DIST_ENV:  # submitit's job inherits the submitting process's environment
        os.environ.pop(key, None)
    os.environ.update(env)
    job = submitit.JobEnvironment()
    if job.num_tasks > 1:  # the trainer's world: a rank per task, rendezvous on the job's first host
        os.environ.update(RANK=str(job.global_rank), LOCAL_RANK=str(job.local_rank), WORLD_SIZE=str(job.num_tasks),
                          MASTER_ADDR=job.hostnames[0], MASTER_PORT=str(20000 + int(str(job.job_id).split("_")[0])
                                                                        % 20000))
    from .train import main

    return main(["--config", config])


class _SlurmRun:
    def __init__(self, job):
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            results = self.job.results()  # one per task
        except Exception:  # noqa: BLE001 - the job failed (its log says why): a failed run
            return 1
        return max(int(r or 0) for r in results)

    def kill(self) -> None:
        self.job.cancel(check=False)

    def stop(self) -> None:
        """Cancel the job: Slurm sends its tasks SIGTERM (the trainer saves a checkpoint) and SIGKILL after
        KillWait."""
        self.job.cancel(check=False)


class SlurmExecutor:
    """Each run a one-node job of `gpus_per_run` tasks (one when there is no GPU); `workers` jobs in flight at once."""

    def __init__(self, workers: int, gpus_per_run: int, params: dict):
        self.workers, self.gpus_per_run = workers, gpus_per_run
        self.params = dict(params)
        self.cluster = self.params.pop("cluster", None)
        self.running: list[_SlurmRun] = []

    def can_start(self) -> bool:
        self.running = [r for r in self.running if r.poll() is None]
        return len(self.running) < self.workers

    def start(self, config: Path, env: dict, log_path: Path) -> _SlurmRun:
        import submitit

        executor = submitit.AutoExecutor(folder=Path(config).parent / "slurm", cluster=self.cluster)
        tasks = max(1, self.gpus_per_run)
        executor.update_parameters(nodes=1, tasks_per_node=tasks, gpus_per_node=self.gpus_per_run,
                                   name=Path(config).parent.name, **self.params)
        run = _SlurmRun(executor.submit(train_job, str(config), env))
        with Path(log_path).open("a") as log:
            log.write(f"submitted as job {run.job.job_id}: logs in {Path(config).parent / 'slurm'}\n")
        self.running.append(run)
        return run


def make_executor(study: dict, visible_gpus: list[int]):
    """The study's executor from its settings (validated by study.plan)."""
    gpus_per_run = study.get("gpus_per_run")
    if gpus_per_run is None:
        gpus_per_run = 1 if visible_gpus else 0
    if study.get("executor", "local") == "slurm":
        return SlurmExecutor(study["workers"], gpus_per_run, study.get("slurm") or {})
    return LocalExecutor(study["workers"], gpus_per_run, visible_gpus)
