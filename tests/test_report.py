"""The report: a table row per run and stage, figures that exist and are not blank."""

import pytest
from PIL import Image

from vlmfast.config import load_config
from vlmfast.report import build_report
from vlmfast.train import run

pytestmark = pytest.mark.slow


def test_report_from_a_pipeline_run(tmp_path):
    raw = {
        "run": {"name": "pipe", "out_dir": str(tmp_path), "checkpoint_every": 100},
        "model": {"path": "tiny:student"},
        "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
        "eval": {"every": 2, "num_problems": 3, "n_samples": 3, "k": [1, 3], "max_new_tokens": 6, "probes": 3},
        "stages": [{"type": "sft", "name": "sft", "steps": 4, "lr": 3e-3, "batch_size": 4},
                   {"type": "cw_dpo", "name": "cw_dpo", "steps": 3, "lr": 1e-3, "batch_size": 4, "max_new_tokens": 6}],
    }
    run(load_config(raw=raw))
    report = build_report([tmp_path / "pipe"], tmp_path / "report")
    text = report.read_text()
    assert "| pipe | sft |" in text and "| pipe | cw_dpo |" in text
    assert "val/pass@3" in text and "[" in text  # bootstrap interval printed
    for name in ("entropy.png", "reward_accuracy.png", "dlogp.png", "cooling_weight.png", "pass_at_k.png"):
        path = tmp_path / "report" / name
        assert f"({name})" in text and path.exists(), name
        img = Image.open(path).convert("L")
        assert img.getextrema()[0] < 200  # something was drawn


def test_pass_at_k_compares_the_last_stage_start_and_end_not_random_weights():
    from vlmfast.report import pass_curve_endpoints

    def ev(stage, step):
        return {"kind": "eval", "stage": stage, "step": step, "pass_curves": {"val/pass_curve": [0.1, 0.2]}}

    sft_grpo = {"records": [ev("sft", 0), ev("sft", 50), ev("grpo", 0), ev("grpo", 20)]}
    assert [(lab, r["stage"], r["step"]) for lab, r, _ in pass_curve_endpoints(sft_grpo)] == [
        ("start", "grpo", 0), ("end", "grpo", 20)]
    no_step0 = {"records": [ev("sft", 0), ev("sft", 50), ev("grpo", 10), ev("grpo", 20)]}
    assert [(r["stage"], r["step"]) for _, r, _ in pass_curve_endpoints(no_step0)] == [("sft", 50), ("grpo", 20)]
    one_stage = {"records": [ev("sft", 50)]}
    assert [lab for lab, _, _ in pass_curve_endpoints(one_stage)] == ["end"]
