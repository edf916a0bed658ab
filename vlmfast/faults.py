"""What a long run survives: a NaN/inf loss (the update is skipped, every rank alike) and a preemption (SIGTERM,
or SIGUSR1, Slurm's warning before it: a checkpoint is saved at the end of the step and the run exits cleanly, to
resume where it stopped).

Both decisions are all-reduced: every rank skips the same update and stops after the same step, whichever rank
saw the NaN or got the signal first (a rank that went its own way would leave the others in a collective)."""

from __future__ import annotations

import os
import signal

import torch

from .ranks import reduce_over_ranks

FAIL_AT_ENV = "VLMFAST_FAIL_AT_STEP"  # tests: "stage:step" raises SimulatedKill there, as a killed run would stop
KILL_AT_ENV = "VLMFAST_KILL_AT"  # tests: "stage:step" or "stage:eval:step" SIGKILLs the process there
SIGNAL_AT_ENV = "VLMFAST_SIGNAL_AT"  # tests: "stage:step:SIGTERM" sends the process that real signal there


class SimulatedKill(RuntimeError):
    """Tests: the run stopped at FAIL_AT_ENV's place (an exception: in-process tests see it)."""


class Preempted(RuntimeError):
    """A signal (SIGTERM, SIGUSR1) stopped the run after a checkpoint: not a failure, resumable."""


class BadStep(RuntimeError):
    """Too many updates in a row had a NaN/inf loss, or one could not be skipped cleanly."""


def finite_everywhere(loss: torch.Tensor) -> bool:
    """The loss is finite on every rank (one all-reduce)."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float64).reshape(1)  # no host read before the reduce
    return reduce_over_ranks(bad, "max").item() == 0


class Preemption:
    """Inside: SIGTERM / SIGUSR1 set a flag (the handlers before are restored on leaving); `requested()` says, on
    every rank alike, whether any rank got one. One for the whole run: a signal during a stage's last step is
    still seen at the stage boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self.signum = None
        self.previous = {}
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers as they are
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self) -> bool:
        flag = torch.tensor([0.0 if self.signum is None else 1.0], dtype=torch.float64)
        return reduce_over_ranks(flag, "max").item() > 0


def signal_if(where: str) -> None:
    """The trainer's one fault seam, for tests, called at each step's start ("stage:step") and after each evaluation
    ("stage:eval:step"): FAIL_AT_ENV raises SimulatedKill there; KILL_AT_ENV sends this process a real SIGKILL, as
    a killed job dies (no exception handler, no atexit, no flush); SIGNAL_AT_ENV="stage:step:SIGNAME" that signal."""
    if os.environ.get(FAIL_AT_ENV) == where:
        raise SimulatedKill(f"simulated kill at {where}")
    if os.environ.get(KILL_AT_ENV) == where:
        os.kill(os.getpid(), signal.SIGKILL)
    stage_step, _, name = os.environ.get(SIGNAL_AT_ENV, "").rpartition(":")
    if stage_step and stage_step == where:
        os.kill(os.getpid(), getattr(signal, name))
