"""The layout as it installs: the top-level `kernels/` (native sources, no __init__.py) never shadows Hugging Face's
`kernels` package, the wheel carries every package under vlmfast/ and nothing else, the sdist carries what CMake
needs to build the native kernels on the installing machine."""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_vlmfast_kernels_is_the_packages_kernels_folder():
    import vlmfast.kernels

    assert Path(vlmfast.kernels.__file__).resolve().parent == ROOT / "vlmfast" / "kernels"


def _python(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_top_level_kernels_folder_is_a_namespace_portion_only():
    assert (ROOT / "kernels" / "cpu" / "token_stats.cpp").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "an __init__.py would make kernels/ shadow HF's package"


def test_a_regular_kernels_package_later_on_sys_path_wins_over_the_repo_folder(tmp_path):
    """The mechanism, with no dependence on what is installed: the repo root first on sys.path (as `python -m`
    from a clone puts it), a regular package `kernels` after it; Python must import the regular one."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'the regular package'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = _python("""
        import sys, kernels
        assert sys.path[0] == '', sys.path[:2]  # -c puts the working directory (the repo root) first
        print(kernels.WHO, kernels.__file__)
    """, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the regular package "), r.stdout
    assert str(tmp_path) in r.stdout


def test_import_kernels_from_the_repo_root_gives_hugging_faces_package():
    r = _python("""
        import importlib.util
        spec = importlib.util.find_spec('kernels')
        print(spec.origin if spec else 'missing')
    """, cwd="/")
    if r.stdout.strip() == "missing":
        pytest.skip("Hugging Face's kernels package is not installed in this venv")
    r = _python("""
        import kernels, transformers
        print(kernels.__file__)
    """, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    origin = Path(r.stdout.strip())
    assert origin.name == "__init__.py" and "site-packages" in origin.parts, origin  # a regular, installed package
    assert ROOT / "kernels" not in origin.parents, origin


def _tree_copy(dest):
    """The files a clean clone has (tracked, plus new ones git does not ignore): builds see what CI sees."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    _tree_copy(src)
    env = dict(os.environ, VLMFAST_BUILD_NATIVE="0")  # the wheel's Python contents; the native build is make's
    sdist = _python(f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))", src, env)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                            "--disable-pip-version-check", "-w", str(out), str(src)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    return next(out.glob("*.tar.gz")), next(out.glob("*.whl"))


def test_the_wheel_carries_every_vlmfast_package_and_no_top_level_kernels(built):
    _, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "vlmfast").rglob("__init__.py")}
    in_wheel = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages <= in_wheel, f"missing from the wheel: {sorted(packages - in_wheel)}"
    assert "vlmfast/stages/grpo.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "the native sources must not install as `kernels`"


def test_the_sdist_carries_the_native_sources_cmake_builds(built):
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "kernels" / "cpu").iterdir()}
    assert {"CMakeLists.txt", "setup.py"} <= names
    assert sources <= names, f"missing from the sdist: {sorted(sources - names)}"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    built_sources = {s for s in sources if s.endswith(".cpp")}
    assert all(s in cmake for s in built_sources), "CMakeLists.txt builds the sources kernels/cpu holds"


def test_console_script_runs():
    exe = Path(sys.executable).parent / "vlmfast"
    assert exe.exists(), "console script `vlmfast` not installed"
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True)
    import vlmfast

    assert out.stdout.strip() == vlmfast.__version__
    bad = subprocess.run([str(exe), "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_public_api_is_reexported():
    import importlib.util

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

    floor = re.search(r'"torch>=([0-9.]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert Version(floor) == max(Version(v) for v, _ in vlmfast.TORCH_APIS.values())
    for _, overload in vlmfast.TORCH_APIS.values():
        op, name = overload.split(".")
        assert name in getattr(torch.ops.aten, op).overloads()
