"""The package installs as designed: vlmfast and vlmfast.kernels import, a top-level `kernels`
does not resolve to this project, and the console script is declared."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_vlmfast_kernels_is_the_repo_kernels_folder():
    import vlmfast.kernels

    assert Path(vlmfast.kernels.__file__).resolve().parent == REPO / "kernels"


def test_top_level_kernels_is_not_this_project(tmp_path):
    # run from an unrelated directory so the repo root is not on sys.path
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else 'none')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "none" or not origin.startswith(str(REPO)), origin


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
