"""Trunk/head split under DeepSpeed ZeRO-3: the lm_head weight is partitioned (empty outside a
gather), and the fused loss run through `call_head` still gets the full weight for forward AND
backward — same loss and gradients as without DeepSpeed. Runs in a fresh process (one CPU rank, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fused_loss_through_call_head_under_zero3():
    script = Path(__file__).parent / "scripts" / "zero3_head.py"
    # DeepSpeed compiles a CPU op on first use; the default TORCH_EXTENSIONS_DIR keeps it between runs
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert out["partitioned_numel"] == 0  # using lm_head.weight directly would see an empty tensor
    plain, zero3 = out["loss"]
    assert abs(plain - zero3) < 1e-5
    for name, rel in out["max_grad_diff"].items():
        assert rel < 1e-4, (name, rel)
