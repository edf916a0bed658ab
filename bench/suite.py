"""The benchmark suite: every op and loss, every provider, side by side in one run.

    python -m bench                                   # make bench: CPU defaults (< 15 min on 2 cores)
    python -m bench --device cuda --models qwen25vl-7b
    python -m bench --ops sft grpo --models cpu-small --tokens 512 2048

For each (op, model head, token count): the providers are first checked to agree with the naive
fp32 result (loss and both gradients); then each provider is timed forward and forward+backward
("full"; backward = full - forward). On a CPU each (op, provider, shape) runs in a fresh process so
its peak RSS is its own; on a GPU each op runs in a process of its own under a deadline (a sticky CUDA error, a
hang or an out-of-memory ends that op alone), timed with `triton.testing.do_bench` and
`torch.cuda.max_memory_allocated`.
Writes rows to bench/results/<device>.jsonl, one plot per op and model (time and memory vs tokens,
a line per provider) and bench/results/summary_<device>.md (ratios vs naive and vs Liger, the
roofline, the static GPU report of the Triton kernels, the end-to-end step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from vlmfast.arguments import positive_int

from . import providers as P
from . import registry
from ._runner import RESULTS, append_rows, environment, measure, reset_peak_rss, run_case

MODES = ("forward", "full")
OP_TIMEOUT_S = 150  # an op's process on a GPU: its compiles, agreement check and every case of the sweep


def _step(fn, x, full: bool):
    """One measured call: the loss forward, or forward + backward (gradients dropped after)."""
    import torch

    def step():
        if full:
            fn(x).backward()
            x["hidden"].grad = x["weight"].grad = None
        else:
            with torch.no_grad():
                fn(x)

    return step


def measure_case(op: str, provider: str, n: int, h: int, v: int, *, device: str = "cpu", repeats: int = 2,
                 threads: int = 2, dtype: str | None = None) -> dict:
    """Time forward, then full (forward + backward), each with its own peak memory. On a CPU this
    runs in a fresh worker process (its peak RSS is its own), in fp32 unless `dtype` says otherwise;
    on a GPU in-process, in bf16."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else None)
    x = P.build(op, n, h, v, device=device, dtype=dtype)
    fn = P.providers(op, device)[provider]
    out = {}
    for mode in MODES:
        full = mode == "full"
        x["hidden"].requires_grad_(full)
        x["weight"].requires_grad_(full)
        if device == "cuda":
            out[mode] = _cuda_time(_step(fn, x, full))
        else:
            out[mode] = measure(_step(fn, x, full), repeats=repeats, warmup=1 if provider == "liger" else 0,
                                rss_inputs=reset_peak_rss())
    return out


def _cuda_time(step) -> dict:
    import torch
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(step, warmup=5, rep=50)
    return {"time_s": ms / 1e3, "peak_above_inputs_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}


def run_ops_isolated(args) -> list[dict]:
    """Each (model, dtype, op) in a `python -m bench --op-worker` process of its own, killed after
    args.op_timeout seconds: the worker appends its rows as its cases finish; an op whose worker times out or dies
    leaves a row saying so, and the next op starts on a fresh CUDA context (a sticky error such as an illegal
    address poisons the context of the process it happened in). Returns the measured rows."""
    import subprocess

    path = args.out / f"{args.device}.jsonl"
    timeout = getattr(args, "op_timeout", None) or OP_TIMEOUT_S
    rows = []
    for model in args.models:
        for dtype_name in args.dtypes or registry.dtypes_for(args.device, model):
            for op in args.ops or registry.ops_for(args.device, model, P.OPS):
                cmd = [sys.executable, "-m", "bench", "--op-worker", "--device", args.device, "--models", model,
                       "--dtypes", dtype_name, "--ops", op, "--out", str(args.out), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
                for flag, value in (("--tokens", args.tokens), ("--providers", args.providers)):
                    cmd += [flag, *map(str, value)] if value else []
                if args.tolerance is not None:
                    cmd += ["--tolerance", str(args.tolerance)]
                seen = len(_lines(path))
                try:
                    code = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, timeout=timeout).returncode
                    error = None if code == 0 else f"its process exited with status {code}"
                except subprocess.TimeoutExpired:
                    error = f"timed out after {timeout:g} s (killed)"
                new = [json.loads(line) for line in _lines(path)[seen:]]
                rows += [r for r in new if "error" not in r]
                if error:
                    append_rows(path, [{"op": op, "model": model, "dtype": dtype_name, "provider": "(the op)",
                                        "error": f"{error}; {len(new)} of its rows were written"}])
                    print(f"  {model:11} {op:11} {dtype_name:8} FAILED: {error}", flush=True)
    return rows


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def cpu_gemm_tflops(threads: int, h: int = 896, v: int = 32768, n: int = 1024) -> float:
    """This CPU's fp32 GEMM throughput (the roofline's 'peak' here), measured with torch.mm."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, h), torch.randn(h, v)
    best = float("inf")
    for _ in range(6):  # the best of several: a peak, not an average
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n * h * v / best / 1e12


def run(args) -> list[dict]:
    """Every case; each row is appended to <out>/<device>.jsonl as soon as it is measured, and a case that
    fails (out of GPU memory, a crashed worker) leaves a row with its error instead of ending the sweep."""
    if args.device == "cuda" and not getattr(args, "op_worker", False):
        return run_ops_isolated(args)
    device = args.device
    env = environment(device, args.threads)
    path = args.out / f"{device}.jsonl"
    rows = []
    for model in args.models:
        h, v = registry.head(model)
        for dtype_name in args.dtypes or registry.dtypes_for(device, model):
            rows += _run_model_dtype(args, model, h, v, dtype_name, env, path)
    return rows


def _run_model_dtype(args, model: str, h: int, v: int, dtype_name: str, env: dict, path: Path) -> list[dict]:
    """Every op and provider on one head in one input dtype, each provider checked against naive in that
    dtype first (fp32: 2e-3, 16-bit: 3e-2 unless --tolerance)."""
    import torch

    device, dtype = args.device, getattr(torch, dtype_name)
    tolerance = args.tolerance if args.tolerance is not None else (2e-3 if dtype == torch.float32 else 3e-2)
    rows = []
    for op in args.ops or registry.ops_for(device, model, P.OPS):
        agree = P.agreement(op, h, v, device=device, n=256 if device == "cpu" else 512, dtype=dtype)
        ok = {p: e for p, e in agree.items() if isinstance(e, float) and e < tolerance}
        for p, e in agree.items():
            if p not in ok:
                print(f"  {op} {dtype_name} {p}: not timed "
                      f"({e if isinstance(e, str) else f'disagrees with naive: {e:.1e}'})", flush=True)
        for n in args.tokens or registry.tokens_for(device, model):
            for provider in [p for p in args.providers or ok if p in ok]:
                case = {"op": op, "provider": provider, "model": model, "n": n, "h": h, "v": v,
                        "dtype": dtype_name, **env}
                try:
                    if device == "cuda":
                        res = measure_case(op, provider, n, h, v, device="cuda", dtype=dtype_name)
                    else:
                        res = run_case("bench.suite", [op, provider, str(n), str(h), str(v), "--repeats",
                                                       str(args.repeats), "--threads", str(args.threads),
                                                       "--dtype", dtype_name])
                except Exception as e:  # noqa: BLE001 - one case's failure is that case's row
                    if device == "cuda":
                        with contextlib.suppress(Exception):  # after a sticky error (illegal address) this raises too
                            torch.cuda.empty_cache()
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    append_rows(path, [{**case, "error": error}])
                    print(f"  {model:11} {op:11} {dtype_name:8} N={n:<6} {provider:16} FAILED: {error}", flush=True)
                    continue
                new = []
                for mode, r in res.items():
                    flops = registry.matmul_flops(P.counted_tokens(n), h, v, mode, teacher_h=h if op == "opd" else 0,
                                                  one_pass=registry.runs_one_pass(op, provider, h))
                    new.append({**case, "mode": mode, "time_s": r["time_s"],
                                "peak_above_inputs_mb": r["peak_above_inputs_mb"],
                                "tflops": flops / r["time_s"] / 1e12, "agreement_rel_err": ok[provider]})
                append_rows(path, new)
                rows += new
                print(f"  {model:11} {op:11} {dtype_name:8} N={n:<6} {provider:16} forward "
                      f"{res['forward']['time_s']:7.3f} s  full {res['full']['time_s']:7.3f} s  "
                      f"peak {res['full']['peak_above_inputs_mb']:7.0f} MB", flush=True)
    return rows


def main(argv=None) -> int:
    import os

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(registry.MODELS))
    ap.add_argument("--ops", nargs="+", default=None, choices=P.OPS, help="default: every op (see registry)")
    ap.add_argument("--providers", nargs="+", default=None, help="default: every provider available")
    ap.add_argument("--tokens", nargs="+", type=positive_int, default=None, help="token counts to sweep")
    ap.add_argument("--repeats", type=positive_int, default=2)
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=("float32", "bfloat16", "float16"),
                    help="input dtypes (default per model, see registry: CPU fp32, plus bf16 on the full vocabulary)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max relative error vs naive (same dtype) to be timed (default: 2e-3 in fp32, 3e-2 in "
                         "16-bit)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end step benchmark")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--op-timeout", type=float, default=OP_TIMEOUT_S,
                    help="on a GPU: seconds an op's process may run before it is killed")
    ap.add_argument("--op-worker", action="store_true", help=argparse.SUPPRESS)  # one op's cases, rows only
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)  # a worker's input dtype (CPU rows)
    args = ap.parse_args(argv)
    if args.worker:
        op, provider, n, h, v = args.worker
        print(json.dumps(measure_case(op, provider, int(n), int(h), int(v), repeats=args.repeats,
                                      threads=args.threads, dtype=args.dtype)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
            return 2
    args.models = args.models or registry.DEFAULT_MODELS[args.device]
    offered = {name for op in args.ops or P.OPS for name in P.providers(op, args.device)}
    unknown = sorted(set(args.providers or ()) - offered)
    if unknown:  # a typo would be filtered out silently after the agreement pass
        ap.error(f"--providers: {', '.join(unknown)} not offered on {args.device} for these ops; "
                 f"offered: {', '.join(sorted(offered))}")
    rows = run(args)  # written to <out>/<device>.jsonl as each case finishes
    if args.op_worker:
        return 0
    from .summary import write_summary

    extra = {}
    if args.device == "cpu":
        extra["cpu_peak_tflops"] = cpu_gemm_tflops(args.threads)
    if not args.no_e2e:
        from .e2e import e2e_rows

        extra["e2e"] = e2e_rows(args.device, args.threads)
        append_rows(args.out / f"{args.device}_e2e.jsonl", extra["e2e"])
        if args.device == "cpu":  # the whole GRPO step by phase, vs TRL's trainer (when its venv exists)
            from .grpo_step import compare

            extra["grpo_step"] = compare(threads=args.threads)
    path = write_summary(rows, args.out, args.device, **extra)
    print(f"\nsummary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
