"""What a long run survives. A NaN/inf loss: every rank skips the update (no backward, no optimizer step), the
record says so, and after run.max_bad_steps in a row the run stops (exit 1) keeping its last checkpoint. A real
SIGTERM or SIGUSR1 (Slurm's warning): the step finishes, a checkpoint is saved, the run exits 0, and run again it
resumes to exactly the numbers of the run that was never stopped."""


import pytest
import torch
from test_resume_kill import RECIPE, train
from test_resume_kill import records as run_records
from test_train import recipe, records

from vlmfast import stages as S
from vlmfast import train as T

pytestmark = pytest.mark.timeout(900)


def _nan_at(monkeypatch, bad_steps):
    real = S.STAGES["sft"].step

    def step_fn(ctx, step):  # the step's micro-batches (one here), each share NaN at a bad step
        out = real(ctx, step)
        return (((loss * float("nan") if step in bad_steps else loss), m)
                for loss, m in ([out] if isinstance(out, tuple) else out))

    monkeypatch.setattr(S.STAGES["sft"], "step", step_fn)


def test_a_nan_loss_skips_the_update(tmp_path, monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    _nan_at(monkeypatch, {1})
    updates = []
    real_step = DeepSpeedEngine.step
    monkeypatch.setattr(DeepSpeedEngine, "step", lambda self, *a, **k: updates.append(1) or real_step(self, *a, **k))
    T.run(recipe(tmp_path, [{"type": "sft", "name": "sft", "steps": 4, "batch_size": 4}],
                 eval={"at_start": False, "probes": 0}))
    rec = records(tmp_path)
    assert [r.get("skipped", 0) for r in rec] == [0, 1, 0, 0] and len(updates) == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for i, r in enumerate(rec) if i != 1)
    from vlmfast.models import load_model

    weights = load_model(str(tmp_path / "t" / "checkpoints" / "final-0" / "hf"))[0].state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2, 3, 4, 5})
    cfg = recipe(tmp_path, [{"type": "sft", "name": "sft", "steps": 8, "batch_size": 4}],
                 run={"max_bad_steps": 2, "checkpoint_every": 2}, eval={"at_start": False, "probes": 0})
    monkeypatch.setattr(T, "load_config", lambda *a, **k: cfg)
    assert T.main(["--config", "unused.yaml"]) == 1
    assert "3 updates in a row had a NaN/inf loss (run.max_bad_steps=2)" in capsys.readouterr().err
    from vlmfast import checkpoint as ckpt

    # the newest checkpoint (after step 4, whose update was skipped) holds the weights of step 2, the last good ones
    assert ckpt.latest(tmp_path / "t" / "checkpoints").name == "step-0-4"


def test_bad_steps_in_a_row_are_counted_across_a_resume(tmp_path, monkeypatch, capsys):
    """Two skipped updates, a kill, the resumed run's first update skipped too: 3 in a row, as the run never killed
    would count them (the count restarting at 0 would let a diverged run go on)."""
    from vlmfast.faults import FAIL_AT_ENV, SimulatedKill

    bad = {2, 3}
    _nan_at(monkeypatch, bad)
    cfg = recipe(tmp_path, [{"type": "sft", "name": "sft", "steps": 8, "batch_size": 4}],
                 run={"max_bad_steps": 2, "checkpoint_every": 2}, eval={"at_start": False, "probes": 0})
    monkeypatch.setenv(FAIL_AT_ENV, "0:4")  # after step 4's checkpoint: 2 skipped in a row so far
    with pytest.raises(SimulatedKill):
        T.run(cfg)
    monkeypatch.delenv(FAIL_AT_ENV)
    bad.clear()
    bad.add(4)
    monkeypatch.setattr(T, "load_config", lambda *a, **k: cfg)
    assert T.main(["--config", "unused.yaml"]) == 1
    assert "3 updates in a row had a NaN/inf loss" in capsys.readouterr().err


def _train(tmp_path, name, signal_at=None):
    """test_resume_kill's GRPO recipe, no periodic checkpoint (the signal's is the only one)."""
    return train(tmp_path, name, {"VLMFAST_SIGNAL_AT": signal_at} if signal_at else None, checkpoint_every=100)


@pytest.mark.slow
def test_a_real_signal_saves_exits_cleanly_and_resumes_to_the_same_numbers(tmp_path):
    whole = _train(tmp_path, "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    want = run_records(tmp_path, "whole")
    # SIGTERM during step 2 (the rollout batch's second update), SIGUSR1 during step 3 (after an evaluation, the next
    # rollout batch's first update: its checkpoint is taken inside the batch)
    for signal_at, saved in (("0:1:SIGTERM", "step-0-2"), ("0:2:SIGUSR1", "step-0-3")):
        name = signal_at.replace(":", "-")
        stopped = _train(tmp_path, name, signal_at)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert f"checkpoint {saved} saved" in stopped.stderr
        assert (tmp_path / name / "checkpoints" / saved).is_dir()
        assert not (tmp_path / name / "results.json").exists()  # stopped, not finished
        resumed = _train(tmp_path, name)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = run_records(tmp_path, name)
        assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
        for a, b in zip(want, got):
            for key in ("loss", "ratio_mean", "kl", "val/accuracy", "val/entropy", "dlogp_pos"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (signal_at, a["step"], key)


@pytest.mark.slow
def test_a_signal_in_a_stages_last_step_stops_at_the_stage_boundary(tmp_path):
    """SIGTERM during the last step of stage 0 of two: the stage ends as usual (its hand-off saved), the run stops
    there instead of starting stage 1, and resumes into stage 1 with the numbers of the run never stopped."""
    two = {**RECIPE, "stages": [{"type": "sft", "name": "sft", "steps": 2, "lr": 2e-3, "batch_size": 4},
                                {**RECIPE["stages"][0], "steps": 2, "updates_per_rollout": 1}]}
    assert train(tmp_path, "whole", recipe=two, checkpoint_every=100).returncode == 0
    stopped = train(tmp_path, "stopped", {"VLMFAST_SIGNAL_AT": "0:1:SIGTERM"}, recipe=two, checkpoint_every=100)
    assert stopped.returncode == 0 and "stopped after stage sft on a signal" in stopped.stderr, stopped.stderr[-3000:]
    assert {r["stage"] for r in run_records(tmp_path, "stopped")} == {"sft"}
    assert train(tmp_path, "stopped", recipe=two, checkpoint_every=100).returncode == 0
    want, got = run_records(tmp_path, "whole"), run_records(tmp_path, "stopped")
    assert [(r["stage"], r["kind"], r["step"]) for r in got] == [(r["stage"], r["kind"], r["step"]) for r in want]
    for a, b in zip(want, got):
        for key in ("loss", "val/accuracy", "val/entropy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["stage"], a["step"], key)


def test_collectives_of_host_tensors_go_to_the_gpu_under_nccl(monkeypatch):
    from vlmfast.ranks import _collective_device

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert _collective_device(torch.zeros(1)) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert _collective_device(torch.zeros(1)) == torch.device("cpu")


@pytest.mark.slow
def test_a_signal_inside_a_gradient_accumulation_waits_for_its_optimizer_step(tmp_path):
    """deepspeed.grad_accum 2, SIGTERM during step 1 (its gradients wait for step 2's): the checkpoint comes after
    step 2, where the optimizer stepped (one after step 1 would lose step 1's gradients: DeepSpeed saves none), and
    the resumed run has the numbers of the run never stopped."""
    accum = {**RECIPE, "deepspeed": {"grad_accum": 2},
             "stages": [{"type": "sft", "name": "sft", "steps": 4, "lr": 2e-3, "batch_size": 4}]}
    assert train(tmp_path, "whole", recipe=accum, checkpoint_every=100).returncode == 0
    stopped = train(tmp_path, "stopped", {"VLMFAST_SIGNAL_AT": "0:0:SIGTERM"}, recipe=accum, checkpoint_every=100)
    assert stopped.returncode == 0 and "checkpoint step-0-2 saved" in stopped.stderr, stopped.stderr[-3000:]
    assert train(tmp_path, "stopped", recipe=accum, checkpoint_every=100).returncode == 0
    want, got = run_records(tmp_path, "whole"), run_records(tmp_path, "stopped")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for a, b in zip(want, got):
        for key in ("loss", "val/accuracy", "val/entropy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
