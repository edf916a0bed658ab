"""What a GRPO step spends its time on, on the tiny model: no forward the update does not need, an engine
with its own weights synced once per rollout (never sampling from stale weights, after a resume too),
evaluation on the stage's engine, and per-phase times that add up to the step and leave evaluation out."""

import time

import pytest
import torch
from test_train import recipe, records

from vlmfast import stage_loop as L
from vlmfast import stages as S
from vlmfast.faults import FAIL_AT_ENV, SimulatedKill
from vlmfast.rollout.hf import HFEngine
from vlmfast.train import run

pytestmark = pytest.mark.slow

GRPO = {"type": "grpo", "name": "grpo", "lr": 1e-3, "batch_size": 2, "group_size": 4, "max_new_tokens": 6}


def _count_forwards(monkeypatch):
    calls = []
    real = S.context.trunk_hidden

    def spy(model, **batch):
        calls.append("grad" if torch.is_grad_enabled() else "no-grad")
        return real(model, **batch)

    for module in (S.context, S.grpo_rollout):  # the update's forward, and the rollout's no-grad ones
        monkeypatch.setattr(module, "trunk_hidden", spy)
    return calls


def test_one_update_per_rollout_runs_no_old_logprob_pass(tmp_path, monkeypatch):
    """With one update per rollout the old log-probs are the update's own (detached): one forward per step,
    the training one; the sampler mismatch is still measured from it. Two updates per rollout need the
    recompute: one no-grad pass over the rollout batch (in two update-sized slices), then the two updates."""
    calls = _count_forwards(monkeypatch)
    run(recipe(tmp_path, [{**GRPO, "steps": 3}], name="one", eval={"at_start": False, "probes": 0, "every": 100}))
    training = calls[: 3]  # the final evaluation's entropy pass comes after
    assert training == ["grad"] * 3
    tr = records(tmp_path, "one")
    assert all(abs(r["ratio_mean"] - 1) < 1e-6 and r["sampler_mismatch"] < 1e-3 for r in tr)
    calls.clear()
    run(recipe(tmp_path, [{**GRPO, "steps": 2, "updates_per_rollout": 2}], name="two",
               eval={"at_start": False, "probes": 0, "every": 100}))
    assert calls[:4] == ["no-grad", "no-grad", "grad", "grad"]


class StaleCheckingEngine(HFEngine):
    """An HF engine that pretends to hold its own weights: it remembers the policy's weights at its last
    sync and fails if asked to sample after they changed, so a missing sync cannot pass unnoticed."""

    holds_weights = True
    syncs = 0

    def __init__(self, model, processor, **kw):
        super().__init__(model, processor, **kw)
        self._snapshot()

    def _snapshot(self):
        self.seen = [p.detach().clone() for p in self.model.parameters()]

    def sync_weights(self, model):
        type(self).syncs += 1
        self._snapshot()

    def generate(self, *args, **kw):
        stale = any(not torch.equal(a, p) for a, p in zip(self.seen, self.model.parameters()))
        assert not stale, "the engine sampled from weights older than the policy's"
        return super().generate(*args, **kw)


def test_engine_syncs_once_per_rollout_and_after_a_resume(tmp_path, monkeypatch):
    """4 updates, 2 per rollout: the second rollout and the final evaluation need a sync (2), not every
    update (4). A run killed after step 2 resumes with the stage-start engine: it must sync before sampling."""
    monkeypatch.setattr(L, "make_engine", lambda name, model, processor, **kw: StaleCheckingEngine(model, processor))
    stages = [{**GRPO, "steps": 4, "updates_per_rollout": 2, "entropy_coef": 0.05}]  # weights move at reward 0
    every2 = {"run": {"checkpoint_every": 2}}
    StaleCheckingEngine.syncs = 0
    run(recipe(tmp_path, stages, name="whole", **every2))
    assert StaleCheckingEngine.syncs == 2
    monkeypatch.setenv(FAIL_AT_ENV, "0:2")  # after the checkpoint at step 2
    with pytest.raises(SimulatedKill):
        run(recipe(tmp_path, stages, name="killed", **every2))
    monkeypatch.delenv(FAIL_AT_ENV)
    StaleCheckingEngine.syncs = 0
    run(recipe(tmp_path, stages, name="killed", **every2))  # the engine's generate asserts it is never stale
    assert StaleCheckingEngine.syncs == 2  # after the checkpoint loaded (before rollout 2), before the last eval
    a, b = records(tmp_path, "whole"), records(tmp_path, "killed")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5, abs=1e-6)


def test_phase_times_add_up_and_evaluation_is_not_charged_to_a_step(tmp_path, monkeypatch, capsys):
    """Every train record splits its step time into generate, logprobs, sync and update; an evaluation that
    takes 100 s (on a clock the test moves: no timing on a shared machine) shows in its own record, never in
    the next step's time or tokens/s."""
    real, real_clock, skew = L.evaluate, time.perf_counter, [0.0]

    def slow_evaluate(*args, **kw):
        skew[0] += 100.0
        return real(*args, **kw)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skew[0])

    monkeypatch.setattr(L, "evaluate", slow_evaluate)
    run(recipe(tmp_path, [{**GRPO, "steps": 4, "updates_per_rollout": 2, "kl_coef": 0.1}],
               eval={"every": 2, "at_start": True}))
    tr, ev = records(tmp_path), records(tmp_path, kind="eval")
    assert [r["step"] for r in ev] == [0, 2, 4] and all(r["timing/eval_s"] >= 100.0 for r in ev)
    for r in tr:
        phases = [r[f"timing/{p}_s"] for p in ("generate", "logprobs", "sync", "update")]
        assert all(x >= 0 for x in phases) and sum(phases) == pytest.approx(r["step_time_s"], rel=1e-9)
        assert r["step_time_s"] < 50.0  # the step after an evaluation is not charged for it
        assert 0 <= r["truncated"] <= 1 and r["response_tokens"] > 0
    # rollouts at steps 1 and 3 generate and recompute old + reference log-probs; steps 2 and 4 do neither
    assert tr[0]["timing/generate_s"] > 0 and tr[0]["timing/logprobs_s"] > 0
    assert tr[1]["timing/generate_s"] == 0 and tr[1]["timing/logprobs_s"] == 0
    assert all(r["timing/sync_s"] == 0 for r in tr)  # the HF engine samples from the policy itself
    err = capsys.readouterr().err
    assert all(f"grpo [{p}]" in err for p in ("generate", "logprobs", "update", "eval"))  # the bar's phase
