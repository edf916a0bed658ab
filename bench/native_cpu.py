"""The native CPU kernels (issue #10) against the pure-PyTorch chunked path and the naive reference,
side by side in one run on this CPU:

    python -m bench.native_cpu                       # N=1024, H=896, V=151936 (Qwen2's head), fp32 and bf16
    python -m bench.native_cpu --tokens 512 --repeats 1 --ops sft

1. The fused ops, forward and forward+backward, on fp32 and on bf16 inputs: token_stats (logp + entropy: its backward
   takes any upstream gradient, so it recomputes the logits, 4 GEMMs) and sft (a loss token_loss runs in one pass,
   3 GEMMs, as naive's). Providers: naive (materialised logits in the input dtype), vlmfast-chunked (PyTorch epilogue;
   bf16: torch's bf16 GEMMs where oneDNN has them, else an fp32 copy of W),
   vlmfast-native (C++ epilogue; bf16: our vdpbf16ps GEMMs with fp32 results, kernels/cpu/gemm_wide.cpp); each
   case in a fresh process (its peak RSS is its own); checked against naive before timing.
2. The per-block epilogue alone, on one block of logits already in memory: forward (block ->
   lse, logp, entropy) and backward (block -> dz), PyTorch ops vs the native kernel.

Rows go to bench/results/native_cpu.jsonl; the tables to bench/results/native_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import providers as P
from ._runner import RESULTS, append_rows, environment, run_case

H, V = 896, 151936
OP_PROVIDERS = ("naive", "vlmfast-chunked", "vlmfast-native")
OPS = ("token_stats", "sft")  # the recompute (4 GEMMs) and one pass (3)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: page faults of the first allocation are not the kernel's
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def epilogue_rows(rows: int, vocab: int, repeats: int, threads: int) -> list[dict]:
    """One [rows, vocab] fp32 block: the chunked backend's PyTorch epilogue vs the native kernel."""
    import torch

    from vlmfast.ops import chunked, native

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, vocab, generator=g) * 2
    y = torch.randint(0, vocab, (rows,), generator=g)
    grads = {"logp": torch.randn(rows, generator=g), "entropy": torch.randn(rows, generator=g)}
    stats = native.block_stats(z, y, None, inv_t=1.0, kl=None, ignore_index=-100)
    head = chunked.LogitsHead(z, need_grad=True)
    os.environ["VLMFAST_NATIVE"] = "0"  # the PyTorch epilogue, as the fallback runs it
    times = {
        ("forward", "pytorch"): _best(lambda: chunked.forward(head, y, temperature=1.0), repeats),
        ("backward", "pytorch"): _best(lambda: chunked.backward(head, y, stats, grads, temperature=1.0), repeats),
        ("forward", "native"): _best(lambda: native.block_stats(z, y, None, inv_t=1.0, kl=None, ignore_index=-100),
                                     repeats),
    }
    out = torch.empty_like(z)
    times["backward", "native"] = _best(
        lambda: native.block_grad_(z, y, None, stats, grads, out, inv_t=1.0, kl=None, ignore_index=-100), repeats)
    os.environ.pop("VLMFAST_NATIVE")
    return [{"bench": "epilogue", "mode": mode, "impl": impl, "rows": rows, "v": vocab, "time_s": t,
             "ns_per_logit": t / (rows * vocab) * 1e9} for (mode, impl), t in times.items()]


DTYPES = {"float32": 2e-3, "bfloat16": 2e-2}  # input dtype: agreement with naive (same dtype) to time it


def op_rows(op: str, n: int, repeats: int, threads: int, dtypes=tuple(DTYPES)) -> list[dict]:
    import torch

    rows = []
    for dtype in dtypes:
        agree = P.agreement(op, H, V, n=min(n, 256), dtype=getattr(torch, dtype))
        for provider in OP_PROVIDERS:
            err = agree.get(provider)
            if not isinstance(err, float) or err > DTYPES[dtype]:
                print(f"  {provider} {dtype}: not timed ({err})", flush=True)
                continue
            res = run_case("bench.suite", [op, provider, str(n), str(H), str(V), "--repeats",
                                           str(repeats), "--threads", str(threads), "--dtype", dtype])
            for mode, r in res.items():
                rows.append({"bench": "op", "op": op, "provider": provider, "dtype": dtype, "n": n,
                             "h": H, "v": V, "mode": mode, "time_s": r["time_s"],
                             "peak_above_inputs_mb": r["peak_above_inputs_mb"], "agreement_rel_err": err})
            print(f"  {op:11} N={n} {dtype:8} {provider:16} forward {res['forward']['time_s']:7.2f} s  full "
                  f"{res['full']['time_s']:7.2f} s  peak {res['full']['peak_above_inputs_mb']:6.0f} MB", flush=True)
    return rows


def markdown(op: list[dict], epi: list[dict], env: dict) -> str:
    lines = [f"# Native CPU kernels vs the PyTorch chunked path ({env['device']}, torch {env['torch']}, "
             f"{env['timestamp']})", "",
             f"## The fused ops: token_stats (logp + entropy; recompute) and sft (one pass), H={H}, V={V}", "",
             "Each row's inputs (hidden, W) in its dtype; outputs and gradients no worse than naive in the same "
             "dtype against fp32 (tests/test_token_stats.py, tests/test_token_loss.py). `vs naive`: naive's full "
             "time over the row's, same op and dtype; `vs fp32`: the same provider's fp32 full time over the row's.",
             "", "| op | N | dtype | provider | forward | full (fwd+bwd) | backward | vs naive (full) | "
             "vs fp32 (full) | peak above inputs |", "|---|---|---|---|---|---|---|---|---|---|"]
    idx = {(r.get("op", "token_stats"), r["n"], r.get("dtype", "float32"), r["provider"], r["mode"]): r for r in op}
    for name, n in sorted({(r.get("op", "token_stats"), r["n"]) for r in op}, key=lambda k: (OPS.index(k[0]), k[1])):
        for dtype in DTYPES:
            base = idx.get((name, n, dtype, "naive", "full"))
            for provider in OP_PROVIDERS:
                f, fw = idx.get((name, n, dtype, provider, "full")), idx.get((name, n, dtype, provider, "forward"))
                if f is None:
                    continue
                fp32 = idx.get((name, n, "float32", provider, "full"))
                vs_naive = f"{base['time_s'] / f['time_s']:.2f}x" if base else "–"
                vs_fp32 = f"{fp32['time_s'] / f['time_s']:.2f}x" if fp32 and dtype != "float32" else "–"
                slow = " **slower than naive**" if base and f["time_s"] > base["time_s"] else ""
                lines.append(f"| {name} | {n} | {dtype} | {provider} | {fw['time_s']:.2f} s | {f['time_s']:.2f} s | "
                             f"{f['time_s'] - fw['time_s']:.2f} s | {vs_naive}{slow} | {vs_fp32} | "
                             f"{f['peak_above_inputs_mb']:.0f} MB |")
    lines += ["", "## The per-block epilogue alone (one fp32 block of logits already in memory)", "",
              "| block | pass | PyTorch | native | speed-up |", "|---|---|---|---|---|"]
    e = {(r["mode"], r["impl"]): r for r in epi}
    for mode in ("forward", "backward"):
        pt, nt = e[mode, "pytorch"], e[mode, "native"]
        lines.append(f"| {pt['rows']} x {pt['v']} | {mode} | {pt['time_s'] * 1e3:.0f} ms "
                     f"({pt['ns_per_logit']:.2f} ns/logit) | {nt['time_s'] * 1e3:.0f} ms "
                     f"({nt['ns_per_logit']:.2f} ns/logit) | {pt['time_s'] / nt['time_s']:.1f}x |")
    lines += ["", "Forward: block -> lse, logp, entropy; backward: block -> dz (PyTorch: the chunked backend's "
              "recompute of log-softmax and the gradient formula; native: one pass, written over a buffer).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.native_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--block-rows", type=int, default=110, help="rows of the epilogue block (64 MB at V=151936)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from vlmfast.ops import native

    if not native.available():
        print(f"native kernels not built: {native._LOAD_ERROR}", file=sys.stderr)
        return 2
    env = environment("cpu", args.threads)
    op = [r for name in args.ops for n in args.tokens
          for r in op_rows(name, n, args.repeats, args.threads, args.dtypes)]
    epi = epilogue_rows(args.block_rows, V, max(3, args.repeats), args.threads)
    rows = [{**r, **env} for r in op + epi]
    append_rows(args.out / "native_cpu.jsonl", rows)
    md = markdown(op, epi, env)
    (args.out / "native_cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
