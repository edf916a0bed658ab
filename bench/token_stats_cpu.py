"""Fused token statistics on this CPU: chunked backend vs the materialised-logits reference, side
by side in one run, at a Qwen2-style head (N=2048, H=896, V=151936 by default).

Each (provider, mode) runs in a fresh subprocess so its peak RSS is its own. Before timing, the
providers are checked to agree numerically. Prints a markdown table of time and memory ratios and
appends JSON rows to bench/results/token_stats_cpu.jsonl.

    python -m bench.token_stats_cpu [--n 2048 --h 896 --v 151936 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._runner import add_common_arguments, append_rows, environment, measure, ratio_table, reset_peak_rss, run_case

RESULTS = Path(__file__).parent / "results" / "token_stats_cpu.jsonl"
PROVIDERS = ("reference", "chunked")
MODES = ("forward", "forward+backward")


def _inputs(n, h, v, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g).div_(h**0.5)  # in place: no transient copy in the peak
    target = torch.randint(0, v, (n,), generator=g)
    grads = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden, weight, target, grads


def worker(provider: str, mode: str, n: int, h: int, v: int, repeats: int, threads: int) -> dict:
    """Time one (provider, mode) in this process; report peak RSS above the inputs."""
    import torch

    from vlmfast import token_stats

    torch.set_num_threads(threads)
    hidden, weight, target, (g_logp, g_ent) = _inputs(n, h, v)
    rss_inputs = reset_peak_rss()
    backward = mode == "forward+backward"

    def step():
        hd = hidden.requires_grad_(backward)
        wt = weight.requires_grad_(backward)
        r = token_stats(hd, wt, target, outputs=("logp", "entropy"), backend=provider, check_inputs=False)
        if backward:
            torch.autograd.backward((r.logp, r.entropy), (g_logp, g_ent))
            hd.grad = wt.grad = None

    return measure(step, repeats=repeats, warmup=1, rss_inputs=rss_inputs)


def check_agreement(n, h, v) -> float:
    """Max |chunked - reference| over logp, entropy and both gradients, on a slice of the problem."""
    import torch

    from vlmfast import token_stats

    hidden, weight, target, (g1, g2) = _inputs(min(n, 256), h, v)
    res = {}
    for p in PROVIDERS:
        hd, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        r = token_stats(hd, wt, target, outputs=("logp", "entropy"), backend=p)
        torch.autograd.backward((r.logp, r.entropy), (g1, g2))
        res[p] = (r.logp, r.entropy, hd.grad, wt.grad)
    err = max((a - b).abs().max().item() for a, b in zip(res["chunked"], res["reference"]))
    if err > 1e-3:
        raise RuntimeError(f"providers disagree by {err}: not timing them")
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap, repeats=3, results=RESULTS)
    ap.add_argument("--worker", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.n, args.h, args.v, args.repeats, args.threads)))
        return 0

    err = check_agreement(args.n, args.h, args.v)
    print(f"token_stats: providers agree, max |chunked - reference| = {err:.2e}", flush=True)
    rows, env = [], environment(args.threads)
    for mode in MODES:
        for provider in PROVIDERS:
            r = run_case("bench.token_stats_cpu", [provider, mode, "--n", str(args.n), "--h", str(args.h),
                                                   "--v", str(args.v), "--repeats", str(args.repeats),
                                                   "--threads", str(args.threads)])
            r.update(op="token_stats", provider=provider, mode=mode, n=args.n, h=args.h, v=args.v,
                     dtype="float32", **env)
            rows.append(r)
            print(f"  {mode:17} {provider:9} {r['time_s']:8.2f} s   peak above inputs "
                  f"{r['peak_above_inputs_mb']:7.0f} MB", flush=True)
    append_rows(args.out, rows)
    n, h, v = args.n, args.h, args.v
    print(f"\ntoken_stats on {env['device']}, N={n}, H={h}, V={v}, fp32 (materialised fp32 logits: "
          f"{n * v * 4 / 2**20:.0f} MB; weight: {v * h * 4 / 2**20:.0f} MB)\n")
    print(ratio_table(rows, case_key="mode", baseline="reference", candidate="chunked"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
