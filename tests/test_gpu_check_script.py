"""`make gpu-check` (bench/gpu_check.sh) on a bare machine decides before it installs anything: with no CUDA torch
in $PY, a driver that cannot run the pinned torch's CUDA (13.0) stops it with exit 2 naming both versions, and a
machine without an NVIDIA driver stops it the same way. Driven here with a stand-in `nvidia-smi` on PATH."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(tmp_path, smi_output: str | None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + (f"echo '{smi_output}'\n" if smi_output else "exit 9\n"))
    no_torch = bin_dir / "python-without-cuda"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    for f in (smi, no_torch):
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": str(no_torch),
           "GPU_CHECK_OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("smi_output,says", [
    ("| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |",
     "the driver runs CUDA 12.4; torch==2.14.1 triton==3.8.0 is built for CUDA 13.0"),
    (None, "nvidia-smi sees no NVIDIA driver"),
], ids=["old-driver", "no-driver"])
def test_a_machine_that_cannot_run_the_pinned_torch_stops_before_installing(tmp_path, smi_output, says):
    venv = ROOT / ".venv-gpu"
    existed = venv.exists()
    res = _run(tmp_path, smi_output)
    assert res.returncode == 2 and says in res.stderr, res.stderr
    assert venv.exists() == existed  # nothing was installed
