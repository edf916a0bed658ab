"""Shared by every benchmark script (below them all: no script imports another for these): a fresh subprocess per
measured case (so its peak RSS is its own), timing, result rows, where results go, and the environment a row names
(device, CPU and its GEMM backend, torch, commit)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"  # where every benchmark writes its rows and summaries


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss()` (VmHWM), else since the process started."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> float:
    """Forget the import-time peaks (Linux: writing 5 to clear_refs resets VmHWM); returns current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return current_rss_mb()


def measure(step, *, repeats: int, warmup: int, rss_inputs: float) -> dict:
    """Median wall time of `step()` and the process's peak RSS above `rss_inputs`."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = peak_rss_mb()
    return {"time_s": statistics.median(times), "times_s": times, "peak_rss_mb": peak,
            "peak_above_inputs_mb": peak - rss_inputs}


def run_case(module: str, worker_args: list[str]) -> dict:
    """Run `python -m module --worker ...` in a fresh process; it prints one JSON line."""
    out = subprocess.run([sys.executable, "-m", module, "--worker", *worker_args], capture_output=True,
                         text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {' '.join(worker_args)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def cpu_name() -> str:
    """The CPU, as precisely as timings need it: the development machine's CPU changes between sessions (Zen 3, 4, 5
    so far) and 16-bit speed hangs on one flag. E.g. "AMD EPYC, x86_64 family 26 model 2, avx512_bf16, bf16 GEMM
    avx512_bf16" (the native GEMM backend chosen for it)."""
    import platform

    import torch

    from vlmfast.ops import native

    info = native.cpu_info()
    parts = [info.get("model name", platform.processor() or "unknown CPU"), platform.machine()]
    if "cpu family" in info:
        parts[-1] += f" family {info['cpu family']} model {info.get('model', '?')}"
    flags = native.cpu_flags()
    sixteen_bit = [f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    parts.append(", ".join(sixteen_bit) or "no 16-bit instructions")
    parts.append(f"bf16 GEMM {native.wide_gemm_path(torch.bfloat16)}")  # native.choose_wide_gemm's pick
    return ", ".join(parts)


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when the tree differs from it), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def environment(device: str, threads: int) -> dict:
    import datetime as dt

    import torch

    env = {"torch": torch.__version__, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit()}
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({cpu_name()}, {threads} threads)"
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    try:
        from importlib.metadata import version

        env["vlmfast"] = version("vlmfast")
    except Exception:
        env["vlmfast"] = None
    return env
