"""The fused-loss quickstart runs end to end and learns: a short run must cut the loss and write
its outputs (the full `vlmfast quickstart` reaches 100% held-out accuracy)."""

import json

import pytest

from vlmfast import quickstart as demo


@pytest.mark.slow
def test_short_demo_learns_and_writes_outputs(tmp_path):
    s = demo.run(tmp_path, steps=150, eval_every=75)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 150
    first, last = recs[0], recs[-1]
    assert last["loss"] < 0.6 * first["loss"]  # chance is log(14) ~ 2.64
    assert last["entropy"] < first["entropy"]
    assert "accuracy" in recs[74] and "accuracy" in last
    assert s["fused_vs_materialised_max_abs_diff"] < 1e-4
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "final_accuracy" in (tmp_path / "summary.md").read_text()


def test_batch_targets_cover_exactly_the_response():
    import torch

    ids, tgt, lengths = demo.make_batch(8, torch.Generator().manual_seed(0))
    for i, k in enumerate(lengths.tolist()):
        digits = ids[i, 1 : k + 1]
        resp = tgt[i][tgt[i] != -100]
        assert torch.equal(resp[:-1], digits.flip(0)) and resp[-1] == demo.EOS
        assert ids[i, k + 1] == demo.EQ


def test_a_bad_step_count_exits_2_before_any_model_is_built(capsys):
    from vlmfast.quickstart import main

    with pytest.raises(SystemExit) as e:
        main(["--steps", "0"])
    assert e.value.code == 2 and "argument --steps: must be >= 1, got 0" in capsys.readouterr().err


def test_python_m_runs_the_command():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "vlmfast.quickstart", "--steps", "many"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "expected a whole number, got 'many'" in res.stderr  # main() ran
