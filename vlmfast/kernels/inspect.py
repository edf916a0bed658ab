"""Compile every shipped Triton kernel config ahead of time for sm_90 (H100) and sm_80 (A100) on a
machine without a GPU, exactly as the JIT would for the Qwen2.5-7B head, and report what the GPU runs.

    python -m vlmfast.kernels.inspect [--arch 90 80] [--json]
    python -m vlmfast.kernels.inspect --estimate      # the static time estimate (vlmfast/kernels/estimate.py)

Each kernel is planned by its own launcher (`forward_launch` / `backward_launch`) on meta tensors of the
7B head's shapes (N = 8192 tokens, H = 3584, V = 152064; a 32B teacher's H = 5120) for a GPU of 132 SMs,
and specialised by Triton's own argument binder: aligned pointers and integer arguments divisible by 16
get `tt.divisibility 16` ("aligned-16"), as on a real launch. That changes registers, pipelining and
shared memory 2-3x against a compile without it. Per kernel: registers, spills, shared memory, the wgmma
instruction shapes, TMA use, CTAs per SM (registers, shared memory and threads), and the grid's waves.

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
SHARED_PER_SM = {90: 233472, 80: 167936}  # bytes; each resident CTA also reserves 1 KiB
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMS = 132  # H100 SXM

# The shapes every kernel is planned for: the Qwen2.5-VL-7B head, a 32B teacher's hidden size.
N_TOKENS, HIDDEN, VOCAB, TEACHER_HIDDEN = 8192, 3584, 152064, 5120
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def shipped_kernels(arch: int = 90):
    """(name, pass, dtype, teacher mode, variant) for every config launched on `arch`; each is compiled in its
    heaviest variant (bias on; the KL gradient on where a teacher is)."""
    from . import token_stats as ts

    out = []
    for (table_arch, variant), table in ts.GPU_CONFIGS.items():
        if table_arch != arch:
            continue
        for (pass_, kind, teacher) in table:
            for dtype in (("bf16", "fp16") if kind == "16bit" else ("fp32",)):
                name = f"token_stats_{pass_}_{variant}[{dtype}, teacher={('none', 'hidden', 'logits')[teacher]}]"
                out.append((name, pass_, dtype, teacher, variant))
    return out


def planned_launch(pass_: str, dtype: str, teacher_mode: int, arch: int, variant: str):
    """The launcher's own plan for the 7B head on meta tensors (no memory, no GPU)."""
    import torch

    from vlmfast.ops._inputs import Teacher

    from . import token_stats as ts

    dt = getattr(torch, _DTYPES[dtype])

    def meta(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    h, w, b, y = meta(N_TOKENS, HIDDEN), meta(VOCAB, HIDDEN), meta(VOCAB), meta(N_TOKENS, dtype=torch.int64)
    teacher = {ts.TEACHER_NONE: None,
               ts.TEACHER_HIDDEN: Teacher(hidden=meta(N_TOKENS, TEACHER_HIDDEN), weight=meta(VOCAB, TEACHER_HIDDEN)),
               ts.TEACHER_LOGITS: Teacher(logits=meta(N_TOKENS, VOCAB))}[teacher_mode]
    # given logits are read at the counted rows (a VLM batch always has prompt tokens): the row-map variant runs
    rows_map = meta(N_TOKENS, dtype=torch.int64) if teacher_mode == ts.TEACHER_LOGITS else None
    where = ts.Target(arch, SMS, tma=variant == "tma")
    if pass_ == "fwd":
        splits = ts.forward_splits(h, w, teacher, where)
        part = meta(ts.NUM_STATS, splits, N_TOKENS, dtype=torch.float32)
        launch = ts.forward_launch(h, w, b, y, part, meta(N_TOKENS, dtype=torch.float32), teacher=teacher,
                                   teacher_rows=rows_map, where=where)
    else:
        rows = ts.backward_chunk_rows(h, w, teacher, where)
        per_token = {k: meta(N_TOKENS, dtype=torch.float32) for k in ("lse", "entropy", "kl", "lse_t")}
        grads = {k: meta(N_TOKENS, dtype=torch.float32) for k in ("logp", "entropy", "kl", "lse")}
        kl_mode = ts.KL_REVERSE if teacher is not None else ts.KL_NONE
        launch = ts.backward_launch(h, w, b, y, per_token, grads, meta(rows, VOCAB), 0, teacher=teacher,
                                    teacher_rows=rows_map, kl_mode=kl_mode, where=where)
    assert launch.kernel.fn.__name__.endswith("sm90_kernel") == (variant == "tma"), launch.kernel
    return launch


def jit_source(launch, arch: int):
    """(ASTSource, options) exactly as `kernel[grid](...)` would build them on a GPU of `arch`: Triton's
    own binder specialises the arguments (divisibility 16 of aligned pointers and integers)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, "num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, attrs


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


def ctas_per_sm(registers: int, shared: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM, from the register file (allocated per warp in units of 256), shared memory
    (1 KiB reserved per CTA) and threads."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * num_warps)
    by_smem = SHARED_PER_SM[arch] // (shared + 1024)
    return max(0, min(by_regs, by_smem, THREADS_PER_SM // (32 * num_warps), MAX_CTAS_PER_SM))


def compile_one(pass_: str, dtype: str, teacher_mode: int, arch: int = 90, variant: str = "portable") -> dict:
    return compile_launch(planned_launch(pass_, dtype, teacher_mode, arch, variant), arch)


def epilogue_launches(arch: int) -> list:
    """(name, launch) of vlmfast/kernels/logits_epilogue.py's kernels as the one-pass path plans them for the 7B head:
    bands of fp32 logits as large as the backward's dz budget, dz in bf16, without and with teacher logits."""
    import torch

    from . import logits_epilogue as ep
    from . import token_stats as ts

    rows = ts.BWD_DZ_BYTES // (4 * VOCAB)

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    where = ts.Target(arch, SMS)
    z, y = meta(rows, VOCAB), meta(rows, dtype=torch.int64)
    per_row = {k: meta(rows) for k in ("lse", "entropy", "kl", "lse_t", "logp")}
    out = []
    for zt in (None, meta(rows, VOCAB)):
        part = meta(ts.NUM_STATS, ep.stats_splits(rows, VOCAB, where), rows)
        teacher = "none" if zt is None else "logits"
        out.append((f"logits_stats[fp32, teacher={teacher}]",
                    ep.stats_launch(z, y, zt, part, meta(rows), temperature=1.0, where=where)))
        out.append((f"logits_grad[fp32 -> bf16, teacher={teacher}]",
                    ep.grad_launch(z, y, zt, per_row, per_row, meta(rows, VOCAB, dtype=torch.bfloat16),
                                   kl_mode=ts.KL_NONE if zt is None else ts.KL_REVERSE, temperature=1.0,
                                   ignore_index=-100, where=where)))
    return out


def epilogue_report(archs=(90, 80)) -> list[dict]:
    """Compile the one-pass epilogue kernels for every arch (a handful: no process pool)."""
    rows = []
    for arch in archs:
        for name, launch in epilogue_launches(arch):
            cfg = launch.config
            rows.append({"kernel": name, "config": {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": 0},
                         **compile_launch(launch, arch)})
    return rows


def compile_launch(launch, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    src, options, attrs = jit_source(launch, arch)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    ptx = k.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    cfg = launch.config
    resident = ctas_per_sm(usage["registers"], k.metadata.shared, cfg.num_warps, arch)
    ctas = launch.grid[0] * launch.grid[1]
    return {
        "arch": f"sm_{arch}",
        "specialization": "aligned-16" if any(["tt.divisibility", 16] in a for a in attrs.values()) else "none",
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "shared": k.metadata.shared,
        "shared_limit": SHARED_LIMIT[arch],
        "wgmma": "wgmma" in ptx,
        "wgmma_shapes": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "ctas_per_sm": resident,
        "grid": list(launch.grid),
        "waves": round(ctas / (resident * SMS), 2) if resident else None,
        **usage,
    }


def _compile_row(job) -> dict:
    arch, index = job  # kernels do not pickle: workers look them up by index
    name, pass_, dtype, teacher, variant = shipped_kernels(arch)[index]
    cfg = planned_launch(pass_, dtype, teacher, arch, variant).config
    row = {"kernel": name, "variant": variant,
           "config": {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h}}
    row.update(compile_one(pass_, dtype, teacher, arch, variant))
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
    ap.add_argument("--epilogue", action="store_true",
                    help="the one-pass path's epilogue kernels (vlmfast/kernels/logits_epilogue.py) instead")
    ap.add_argument("--estimate", action="store_true",
                    help="the static time estimate of token_stats and token_loss at the 7B head instead (no compile)")
    args = ap.parse_args(argv)
    if args.estimate:
        from .estimate import report as estimate

        print(estimate(H=HIDDEN, V=VOCAB))
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.epilogue and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    rows = epilogue_report(tuple(args.arch)) if args.epilogue else report(tuple(args.arch))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = f"{'kernel':46} {'arch':6} {'tiles (N,V,H)':14} {'warps':>5} {'stages':>6} {'regs':>4} " \
           f"{'spill B':>7} {'smem B':>7} {'wgmma':>12} {'tma':>3} {'CTA/SM':>6} {'waves':>6}"
    print(f"compiled as the JIT specialises the 7B head (N={N_TOKENS}, H={HIDDEN}, V={VOCAB}), {SMS} SMs")
    print(head)
    print("-" * len(head))
    for r in rows:
        c = r["config"]
        tiles = f"{c['BLOCK_N']},{c['BLOCK_V']},{c['BLOCK_H']}"
        tc = ",".join(r["wgmma_shapes"]) or ("mma" if r["mma"] else "NONE")
        print(f"{r['kernel']:46} {r['arch']:6} {tiles:14} {r['num_warps']:>5} {r['num_stages']:>6} "
              f"{r['registers']:>4} {r['spill_stores']:>7} {r['shared']:>7} {tc:>12} {'yes' if r['tma'] else 'no':>3} "
              f"{r['ctas_per_sm']:>6} {r['waves']!s:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
