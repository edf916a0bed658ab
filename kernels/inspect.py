"""Compile every shipped Triton kernel config ahead of time for sm_90 (H100) and sm_80 (A100) on a
machine without a GPU, and report registers, spills, shared memory and whether tensor-core
instructions (wgmma on sm_90a, mma on sm_80) were generated.

    python -m vlmfast.kernels.inspect [--arch 90 80] [--json]

Must run with TRITON_INTERPRET unset or 0 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

H100_SHARED_LIMIT = 232448  # bytes per block (opt-in maximum)
A100_SHARED_LIMIT = 166912
SHARED_LIMIT = {90: H100_SHARED_LIMIT, 80: A100_SHARED_LIMIT}

_TRITON_DTYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_INPUT_POINTERS = {"h_ptr", "w_ptr", "b_ptr", "ht_ptr", "wt_ptr", "bt_ptr", "zt_ptr", "dz_ptr"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "y_ptr":
            sig[name] = "*i64"
        elif name in _INPUT_POINTERS:
            sig[name] = _TRITON_DTYPE[dtype]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "inv_t":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def shipped_kernels(arch: int = 90):
    """(name, kernel, dtype, constexprs, num_warps, num_stages) for every config launched on `arch`.

    Each config is compiled in its heaviest variant (bias on; KL gradient on where a teacher is).
    """
    from . import token_stats as ts

    out = []
    for (pass_, kind, teacher), cfg in ts.GPU_CONFIGS[arch].items():
        fn = ts._token_stats_fwd_kernel if pass_ == "fwd" else ts._token_stats_bwd_kernel
        for dtype in (("bf16", "fp16") if kind == "16bit" else ("fp32",)):
            cx = dict(HAS_BIAS=True, TEACHER=teacher, HAS_TEACHER_BIAS=False, BLOCK_N=cfg.block_n,
                      BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, IEEE=dtype == "fp32")
            if pass_ == "bwd":
                cx["KL"] = 1 if teacher else 0
            name = f"token_stats_{pass_}[{dtype}, teacher={('none', 'hidden', 'logits')[teacher]}]"
            out.append((name, fn, dtype, cx, cfg.num_warps, cfg.num_stages))
    return out


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack from ptxas -v (the bundled ptxas for this PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # older Triton: get_ptxas() takes no argument
        ptxas = get_ptxas().path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "registers": regs,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "stack": int(stack.group(1)) if stack else 0,
    }


def compile_one(fn, dtype, constexprs, num_warps, num_stages, arch=90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    return {
        "arch": f"sm_{arch}",
        "num_warps": num_warps,
        "num_stages": num_stages,
        "shared": k.metadata.shared,
        "shared_limit": SHARED_LIMIT[arch],
        "wgmma": "wgmma" in ptx,
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        **usage,
    }


def _compile_row(job) -> dict:
    arch, index = job  # kernels do not pickle: workers look them up by index
    name, fn, dtype, cx, warps, stages = shipped_kernels(arch)[index]
    row = {"kernel": name, "config": {k: v for k, v in cx.items() if k.startswith("BLOCK")}}
    row.update(compile_one(fn, dtype, cx, warps, stages, arch))
    return row


def report(archs=(90, 80), workers: int | None = None) -> list[dict]:
    """Compile every shipped config for every arch (in parallel: ptxas is single-threaded)."""
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    jobs = [(arch, i) for arch in archs for i in range(len(shipped_kernels(arch)))]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_row(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_compile_row, jobs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = report(tuple(args.arch))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = f"{'kernel':48} {'arch':6} {'tiles (N,V,H)':15} {'warps':>5} {'stages':>6} {'regs':>4} " \
           f"{'spill B':>7} {'smem B':>7} {'tensor cores':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        c = r["config"]
        tiles = f"{c['BLOCK_N']},{c['BLOCK_V']},{c['BLOCK_H']}"
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "NONE")
        print(f"{r['kernel']:48} {r['arch']:6} {tiles:15} {r['num_warps']:>5} {r['num_stages']:>6} "
              f"{r['registers']:>4} {r['spill_stores']:>7} {r['shared']:>7} {tc:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
