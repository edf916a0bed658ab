"""The package installs as designed: vlmfast and vlmfast.kernels import, a top-level `kernels` never resolves to
this project (not even from the repo root, where `python -m` puts it on sys.path), and the console script is
declared."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_vlmfast_kernels_is_the_packages_kernels_folder():
    import vlmfast.kernels

    assert Path(vlmfast.kernels.__file__).resolve().parent == REPO / "vlmfast" / "kernels"


def test_top_level_kernels_is_not_this_project():
    """transformers >= 5.25 imports Hugging Face's `kernels` package: run from the repo root (as `python -m
    vlmfast.train` and the tests are), `kernels` must not be a folder of this project."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else 'none')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert not (REPO / "kernels").exists() and not origin.startswith(str(REPO / "kernels")), origin


def test_console_script_runs():
    exe = Path(sys.executable).parent / "vlmfast"
    assert exe.exists(), "console script `vlmfast` not installed"
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True)
    import vlmfast

    assert out.stdout.strip() == vlmfast.__version__
    bad = subprocess.run([str(exe), "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_public_api_is_reexported():
    import vlmfast

    for name in ("token_stats", "token_stats_from_logits", "cooling_weight", "sequence_mean", "Teacher", "TokenStats"):
        assert hasattr(vlmfast, name), name
    assert importlib.util.find_spec("vlmfast.ops.chunked") is not None


def test_torch_floor_is_the_oldest_release_with_every_api_the_code_calls():
    """setup.py's torch floor equals the newest of the versions that introduced the APIs the code calls, and the
    installed torch has each of them (their aten overloads)."""
    import re

    import torch
    from packaging.version import Version

    import vlmfast

    floor = re.search(r'"torch>=([0-9.]+)"', (REPO / "setup.py").read_text()).group(1)
    assert Version(floor) == max(Version(v) for v, _ in vlmfast.TORCH_APIS.values())
    for _, overload in vlmfast.TORCH_APIS.values():
        op, name = overload.split(".")
        assert name in getattr(torch.ops.aten, op).overloads()
