"""What trackers that cannot take a point back are sent across several resumes: every record once."""

import importlib.machinery
import sys
import types


def test_a_second_resume_does_not_resend_what_the_first_killed_run_sent(tmp_path, monkeypatch):
    """A: logged steps 1-10, checkpoint at 5, killed. B: resumed at 5 (6-10 known as sent), killed at 7 after a
    checkpoint at 6. C: resumed at 6; the file holds 1-7 only, yet 8-10 were sent by A and must not go again."""
    from vlmfast.tracking import open_trackers

    logged = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: None
    fake.define_metric = lambda *a, **kw: None
    fake.log = lambda d: logged.append(d["s/step"])
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def rec(step):
        return {"stage": "s", "stage_index": 0, "step": step, "kind": "train", "loss": 1.0}

    def attempt(resume_at, dropped, steps):
        (tracker,) = open_trackers(["wandb"], tmp_path, "r", {}, resume_at=resume_at,
                                   sent={(0, k, "train") for k in dropped})
        for k in steps:
            tracker.log(rec(k))

    attempt(None, [], range(1, 11))  # A
    attempt((0, 5), range(6, 11), range(6, 8))  # B: replays 6-7 (sent by A)
    attempt((0, 6), [7], range(7, 13))  # C: its file lost 8-10, A's trackers have them
    assert sorted(logged) == list(range(1, 13))  # each step once
