"""A static time estimate of the fused head on a GPU nobody ran it on: `python -m vlmfast.kernels.inspect
--estimate` prints it for token_stats (forward + backward, 8 n H V FLOP) and token_loss (the one pass the losses
run from one_pass.TRITON_MIN_HIDDEN, 6 n H V) at the Qwen2.5-VL-7B head, n counted tokens.

Every term is priced for the plan the launchers make for those shapes (tiles, vocabulary slices, dz chunks, bands),
in 16-bit inputs:

- a Triton logits pass (token_stats' forward; its backward's recompute, which also writes dz): the tensor cores'
  time for its 2 n H V FLOP at the dense peak, divided by the wave efficiency (programs / (whole waves x one CTA
  per SM): the last wave's empty slots cost their time too), plus the epilogue over each logits tile, which runs
  in the same warps after the tile's MMA (no warp specialisation, docs/platform.md: serialised, so added), at
  the GPU's exp (MUFU) and fp32 FMA rates; against the L2 time of re-streaming the operands, (n / BLOCK_N)
  (V / BLOCK_V) (BLOCK_N + BLOCK_V) H x 2 bytes. The pass takes the longer of the two.
- cuBLAS GEMMs (dh = dz W, dW += dz^T h, and the one pass's logits) at CUBLAS_EFFICIENCY of the peak.
- HBM traffic beside them, not hidden: dz [n, V] written once and read by both GEMMs; dW's fp32 [V, H]
  read and written once per dz chunk or band (the GEMM accumulates in place); the one pass's fp32 logits
  written by its GEMM and read by its statistics and gradient kernels.

The GPU's numbers are its data sheet's (SMs, clock, dense 16-bit peak, HBM) and one assumption, the L2-to-SM
bandwidth: nothing here has been timed on a GPU; `make gpu-check` measures what this predicts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_ghz: float  # boost
    dense_tflops: float  # 16-bit tensor cores, dense
    hbm_tbps: float
    l2_tbps: float  # L2 to SMs: assumed, no data sheet gives it
    exps_per_sm_clock: int = 16  # MUFU.EX2 throughput
    fp32_lanes_per_sm: int = 128  # FMA per clock


H100 = GPU("H100 SXM", sms=132, clock_ghz=1.83, dense_tflops=989.0, hbm_tbps=3.35, l2_tbps=5.5)
CUBLAS_EFFICIENCY = 0.7  # of the dense peak, on these large GEMMs
# per logit of a tile, the epilogue's work (kernels/token_stats.py `_online_update`, `_dz_tile`): one exp; the
# running max, rescale, the two sums and the target select in the forward, p, the dz terms and the store's
# conversion in the backward
EPILOGUE_FMAS = {"fwd": 6, "bwd": 8}


def _meta(*shape, dtype=None):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.bfloat16, device="meta")


def _target(gpu: GPU):
    from .token_stats import Target

    return Target(90, gpu.sms, tma=True)


def logits_pass(pass_: str, n: int, H: int, V: int, gpu: GPU = H100) -> dict:
    """One Triton logits pass over n rows (the backward: all its dz chunks), as planned: seconds per term."""
    import triton

    from . import token_stats as ts

    where = _target(gpu)
    h, w = _meta(n, H), _meta(V, H)
    cfg = ts._variant_and_config(pass_, h, w, None, where)[1]
    if pass_ == "fwd":
        programs = triton.cdiv(n, cfg.block_n) * ts.forward_splits(h, w, None, where)
    else:  # chunk after chunk, each its own launch of row blocks x vocabulary tiles
        rows = ts.backward_chunk_rows(h, w, None, where)
        programs = sum(triton.cdiv(min(rows, n - r0), cfg.block_n) for r0 in range(0, n, rows)) \
            * triton.cdiv(V, cfg.block_v)
    wave = gpu.sms  # one CTA per SM: every sm_90 config as compiled (docs/fused_ops.md)
    efficiency = ts.wave_efficiency(programs, wave)
    flops = 2 * n * H * V
    mma = flops / (gpu.dense_tflops * 1e12) / efficiency
    logits = n * V
    epilogue = logits / (gpu.sms * gpu.clock_ghz * 1e9) * max(1 / gpu.exps_per_sm_clock,
                                                              EPILOGUE_FMAS[pass_] / gpu.fp32_lanes_per_sm)
    operands = triton.cdiv(n, cfg.block_n) * triton.cdiv(V, cfg.block_v) * (cfg.block_n + cfg.block_v) * H * 2
    l2 = operands / (gpu.l2_tbps * 1e12)
    return {"flops": flops, "wave_efficiency": efficiency, "mma": mma, "epilogue": epilogue, "l2": l2,
            "tiles": (cfg.block_n, cfg.block_v), "time": max(mma + epilogue, l2)}


def _gemms(flops: float, gpu: GPU) -> float:
    return flops / (CUBLAS_EFFICIENCY * gpu.dense_tflops * 1e12)


def _hbm(nbytes: float, gpu: GPU) -> float:
    return nbytes / (gpu.hbm_tbps * 1e12)


def token_stats_time(n: int, H: int, V: int, gpu: GPU = H100) -> dict:
    """token_stats forward + backward (any upstream gradient): forward pass, backward recompute writing dz, dh and dW
    GEMMs, dz's and dW's HBM traffic. Seconds per term and in all."""
    from . import token_stats as ts

    chunks = -(-n // ts.backward_chunk_rows(_meta(n, H), _meta(V, H), None, _target(gpu)))
    fwd, bwd = logits_pass("fwd", n, H, V, gpu), logits_pass("bwd", n, H, V, gpu)
    terms = {"forward (Triton)": fwd["time"], "backward recompute + dz (Triton)": bwd["time"],
             "dh, dW GEMMs": _gemms(4 * n * H * V, gpu),
             "dz traffic": _hbm(3 * n * V * 2, gpu),  # written, read by both GEMMs
             f"dW read-modify-write ({chunks} chunks)": _hbm(chunks * 2 * V * H * 4, gpu)}
    return {"terms": terms, "flops": fwd["flops"] + bwd["flops"] + 4 * n * H * V, "time": sum(terms.values())}


def token_loss_time(n: int, H: int, V: int, gpu: GPU = H100) -> dict:
    """token_loss' one pass (the gradient known in the forward): per band the logits GEMM (fp32 out), the statistics
    and dz kernels reading them, the dh and dW GEMMs; their HBM traffic. Seconds per term and in all."""
    from ..ops import one_pass

    rows = one_pass.budget_rows("triton", n, _meta(n, H), _meta(V, H), where=_target(gpu))
    bands = -(-n // rows)
    # fp32 logits written by the GEMM, read by the statistics and the dz kernels; dz written, read by both GEMMs
    traffic = n * V * (3 * 4 + 3 * 2)
    terms = {"logits GEMM": _gemms(2 * n * H * V, gpu), "dh, dW GEMMs": _gemms(4 * n * H * V, gpu),
             "logits + dz traffic": _hbm(traffic, gpu),
             f"dW read-modify-write ({bands} bands)": _hbm(bands * 2 * V * H * 4, gpu)}
    return {"terms": terms, "flops": 6 * n * H * V, "time": sum(terms.values())}


def report(tokens=(2048, 8192, 65536), H: int = 3584, V: int = 152064, gpu: GPU = H100) -> str:
    lines = [f"static estimate on an {gpu.name} (dense {gpu.dense_tflops:g} TFLOP/s, HBM {gpu.hbm_tbps} TB/s, "
             f"L2 {gpu.l2_tbps} TB/s assumed, cuBLAS at {CUBLAS_EFFICIENCY:.0%}), H={H}, V={V}, bf16", ""]
    for n in tokens:
        for name, fn in (("token_stats fwd+bwd", token_stats_time), ("token_loss one pass", token_loss_time)):
            r = fn(n, H, V, gpu)
            terms = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r["terms"].items())
            lines.append(f"N={n:<6} {name:20} {r['time'] * 1e3:8.2f} ms  {r['flops'] / r['time'] / 1e12:5.0f} "
                         f"TFLOP/s  ({terms} ms)")
        fwd = logits_pass("fwd", n, H, V, gpu)
        ms = {k: fwd[k] * 1e3 for k in ("mma", "epilogue", "l2")}
        lines.append(f"{'':8}forward pass: tiles {fwd['tiles']}, wave efficiency {fwd['wave_efficiency']:.2f}, "
                     f"MMA {ms['mma']:.2f} + epilogue {ms['epilogue']:.2f} ms vs L2 {ms['l2']:.2f} ms")
    return "\n".join(lines)
