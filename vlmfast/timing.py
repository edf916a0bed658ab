"""Where a training step's time goes: generate (sampling), logprobs (no-grad passes: old, reference and
teacher log-probs), sync (weights into the generation engine) and update (the rest: the training forward,
backward and optimizer step, with batch assembly), so the four add up to the step's time. Evaluation is
timed apart and never charged to a step.
"""

from __future__ import annotations

import contextlib
import time

import torch

PHASES = ("generate", "logprobs", "sync", "update")


def _device_sync() -> None:
    """Work queued on the GPU belongs to the phase that queued it: wait for it at every boundary."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer:
    """`with timer("generate"): ...` inside a step; `timer.start()` at its start and `timer.stop()` at its
    end return the step's record: timing/<phase>_s for each phase, and step_time_s, their sum."""

    def __init__(self, on_phase=None):
        self.spent: dict[str, float] = {}
        self.t0 = None
        self.phase = None
        self.on_phase = on_phase  # called with each phase as it starts (the progress bar shows it)

    def show(self, phase: str | None) -> None:
        """What runs now (also "eval", outside a step's phases): told to on_phase."""
        self.phase = phase
        if self.on_phase is not None and phase is not None:
            self.on_phase(phase)

    def start(self) -> None:
        _device_sync()
        self.spent = {}
        self.show("update")  # the rest of a step is the update's work
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if phase not in PHASES or phase == "update":
            raise ValueError(f"phase must be one of {PHASES[:-1]} (update is the rest), got {phase!r}")
        _device_sync()
        around = self.phase
        self.show(phase)
        t = time.perf_counter()
        try:
            yield
        finally:
            _device_sync()
            self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - t
            self.show(around)

    def stop(self) -> dict:
        _device_sync()
        total = time.perf_counter() - self.t0
        timed = {p: self.spent.get(p, 0.0) for p in PHASES[:-1]}
        record = {f"timing/{p}_s": v for p, v in timed.items()}
        record["timing/update_s"] = max(total - sum(timed.values()), 0.0)
        record["step_time_s"] = sum(record.values())
        return record
