"""What each checkpoint holds, read from its files (a 7B run's checkpoints were ~110 GB each): a step checkpoint
holds the engine state a resume reads and no HF export; a hand-off checkpoint (best-, final-) holds the HF weights
and no optimizer state; only the newest run.checkpoint_keep step checkpoints stay, pruned ones are moved out of
sight at once and deleted in the background; `latest` names only resumable checkpoints; the world size is recorded
and a resume on another stops before anything loads; the HF export gathers one module at a time."""

import json

import pytest
import torch
from test_train import recipe

from vlmfast import checkpoint as ckpt
from vlmfast import train as T
from vlmfast.config import ConfigError
from vlmfast.faults import FAIL_AT_ENV, SimulatedKill

pytestmark = pytest.mark.timeout(900)

STAGES = [{"type": "sft", "name": "sft", "steps": 5, "batch_size": 4,
           "early_stopping": {"metric": "val/accuracy", "patience": 100}}]


def _cfg(tmp_path):
    return recipe(tmp_path, STAGES, run={"checkpoint_every": 1, "checkpoint_keep": 2},
                  eval={"every": 2, "at_start": False, "probes": 0})


def _files(path):
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_each_checkpoint_holds_what_is_read_from_it(tmp_path, monkeypatch):
    root = tmp_path / "t" / "checkpoints"
    monkeypatch.setenv(FAIL_AT_ENV, "0:4")  # stopped before step 5: step checkpoints 1-4 were written
    with pytest.raises(SimulatedKill):
        T.run(_cfg(tmp_path))
    ckpt.finish_deletions()
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0-3", "step-0-4"]  # checkpoint_keep: 2
    assert not list(root.glob(".trash-*")) and not list(root.glob(".tmp-*"))
    assert (root / "latest").read_text() == "step-0-4"  # not best-0, saved at step 4's evaluation
    step = _files(root / "step-0-4")
    assert not any(f.startswith("hf/") for f in step), step
    assert "engine/mp_rank_00_model_states.pt" in step  # without ZeRO the optimizer's state is in it
    engine_state = torch.load(root / "step-0-4" / "engine" / "mp_rank_00_model_states.pt", weights_only=False)
    assert engine_state["optimizer"]["state"] and engine_state["module"]
    assert json.loads((root / "step-0-4" / "state.json").read_text())["world_size"] == 1
    best = _files(root / "best-0")
    assert "hf/config.json" in best and "hf/model.safetensors" in best
    assert not any(f.startswith("engine/") for f in best), best

    before = json.loads((root / "step-0-4" / "state.json").read_text())["stage_elapsed_s"]
    monkeypatch.delenv(FAIL_AT_ENV)
    T.run(_cfg(tmp_path))  # resumes from step-0-4
    ckpt.finish_deletions()
    # the stage's time counts its steps before the kill (4 steps, 2 evaluations) and after (1 step)
    assert json.loads((tmp_path / "t" / "results.json").read_text())["timings_s"]["sft"] > before > 0
    assert not list(root.glob("step-*")) and not list(root.glob(".trash-*"))  # the stage is done: all pruned
    assert (root / "latest").read_text() == "done-0"
    hand_off = json.loads((root / "done-0" / "state.json").read_text())["next_stage_start"]
    assert hand_off.endswith("best-0/hf") or hand_off.endswith("final-0/hf")
    for tag in ("best-0",) + (("final-0",) if (root / "final-0").exists() else ()):
        assert not any(f.startswith("engine/") for f in _files(root / tag))


def test_a_resume_on_another_world_size_stops_before_loading(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    root = tmp_path / "t" / "checkpoints"
    (root / "step-0-2").mkdir(parents=True)
    (root / "step-0-2" / "state.json").write_text(json.dumps({"stage_index": 0, "step": 2, "tag": "step-0-2",
                                                             "world_size": 8}))
    (root / "latest").write_text("step-0-2")
    monkeypatch.setattr(T, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"step-0-2 was written by 8 ranks and this run has 1: resume it on 8"):
        T.run(cfg)


def test_the_hf_export_gathers_one_module_at_a_time(monkeypatch):
    """export_state_dict walks the modules and gathers each one's own parameters (under ZeRO-3 a collective per
    module, as DeepSpeed's 16-bit save): no call holds more than the largest module's own parameters; the dict is
    the model's state dict, copied."""
    from vlmfast.models import tiny_vlm

    model = tiny_vlm("student")[0]
    calls = []
    real = ckpt.gathered

    def recording(params):
        calls.append(sum(p.numel() for p in params))
        return real(params)

    monkeypatch.setattr(ckpt, "gathered", recording)
    out = ckpt.export_state_dict(model)
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert max(calls) == largest_module < sum(p.numel() for p in model.parameters()) / 4
    want = model.state_dict()
    assert out.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(out[k], v) and out[k].data_ptr() != v.data_ptr(), k


def test_resume_never_sets_the_earlier_run_aside(tmp_path, monkeypatch, capsys):
    """run.resume: never in a run dir an earlier run left at step 4: its outputs move to replaced-<time>/ untouched.
    Left in place, its step checkpoints (newer by step) would outlive the new run's in the pruning: the new run,
    killed at step 2, would find `latest` naming a pruned checkpoint and start over."""
    root = tmp_path / "t" / "checkpoints"

    def cfg(**run):
        return recipe(tmp_path, STAGES, run={"checkpoint_every": 1, "checkpoint_keep": 2, **run},
                      eval={"every": 100, "at_start": False, "probes": 0})

    monkeypatch.setenv(FAIL_AT_ENV, "0:4")
    with pytest.raises(SimulatedKill):
        T.run(cfg())
    before = (tmp_path / "t" / "metrics.jsonl").read_text()
    monkeypatch.setenv(FAIL_AT_ENV, "0:2")  # the new run: killed before its step 3
    with pytest.raises(SimulatedKill):
        T.run(cfg(resume="never"))
    ckpt.finish_deletions()
    aside = list((tmp_path / "t").glob("replaced-*"))
    assert len(aside) == 1 and "moved to" in capsys.readouterr().out
    assert (aside[0] / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (aside[0] / "checkpoints").glob("step-*")) == ["step-0-3", "step-0-4"]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0-1", "step-0-2"]
    assert (root / "latest").read_text() == "step-0-2"
    monkeypatch.delenv(FAIL_AT_ENV)
    T.run(cfg())  # resumes the new run from its step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_every_checkpoint_file_is_on_disk_before_it_is_named(tmp_path, monkeypatch):
    """fsync of every file a checkpoint holds (engine states, rank files, state.json) while it is still .tmp-<tag>,
    and of the `latest` pointer: renames alone survive a killed process, not a machine that goes down."""
    import os

    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    T.run(recipe(tmp_path, [{**STAGES[0], "steps": 2}], run={"checkpoint_every": 1, "checkpoint_keep": 5},
                 eval={"every": 100, "at_start": False, "probes": 0}))
    root = tmp_path / "t" / "checkpoints"
    hand_off = next(t for t in ("final-0", "best-0") if (root / t).exists())
    for tag in ("step-0-1", hand_off):
        files = {f.replace(".tmp-", "").replace("/.state.json.tmp", "/state.json")  # as named once in place
                 for f in synced if f"/.tmp-{tag}/" in f}
        want = {str(root / tag / f) for f in _files(root / tag)} if (root / tag).exists() else set()
        assert files and files >= want, tag
    assert any(f.endswith("/checkpoints/.latest.tmp") for f in synced)  # the pointer, before its rename
