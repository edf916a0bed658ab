"""Benchmark rows -> plots (time and memory vs tokens, a line per provider, one figure per op and
model) and a markdown summary: ratios vs naive and vs Liger, the roofline, the static GPU report of
the Triton kernels, the end-to-end step."""

from __future__ import annotations

from pathlib import Path

from vlmfast.ops.one_pass import TRITON_MIN_HIDDEN

from . import registry
from .providers import counted_tokens


def _dtype(r) -> str:
    return r.get("dtype", "float32")  # rows from before the dtype column were fp32 on a CPU


def _index(rows):
    return {(r["op"], r["model"], r["n"], _dtype(r), r["mode"], r["provider"]): r for r in rows}


def plots(rows, out: Path, device: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for op, model in dict.fromkeys((r["op"], r["model"]) for r in rows):
        sel = [r for r in rows if r["op"] == op and r["model"] == model and r["mode"] == "full"]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.6))
        for provider, dtype in dict.fromkeys((r["provider"], _dtype(r)) for r in sel):
            pts = sorted((r["n"], r["time_s"], r["peak_above_inputs_mb"]) for r in sel
                         if (r["provider"], _dtype(r)) == (provider, dtype))
            ns = [p[0] for p in pts]
            label = provider if dtype == "float32" else f"{provider} ({dtype})"
            ax_t.plot(ns, [p[1] for p in pts], "o-" if dtype == "float32" else "s--", label=label)
            ax_m.plot(ns, [p[2] for p in pts], "o-" if dtype == "float32" else "s--", label=label)
        h, v = registry.head(model)
        for ax, title, unit in ((ax_t, "time, forward+backward", "s"), (ax_m, "peak memory above inputs", "MB")):
            ax.set(title=f"{op} · {model} (H={h}, V={v}) · {title}", xlabel="tokens N", ylabel=unit)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.title.set_fontsize(9)
        ax_t.legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"{device}_{op}_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def ratio_table(rows, baseline: str) -> str:
    """Per (op, model, N, dtype): each provider's full time and peak memory, as ratios to `baseline` in the
    same dtype; a provider slower than it is flagged."""
    idx = _index(rows)
    lines = [f"| op | model | N | dtype | provider | full time | backward | speed-up vs {baseline} | peak | "
             f"{baseline} peak / peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for op, model, n, dtype in dict.fromkeys((r["op"], r["model"], r["n"], _dtype(r)) for r in rows):
        base = idx.get((op, model, n, dtype, "full", baseline))
        if base is None:
            continue
        same = [r for r in rows if (r["op"], r["model"], r["n"], _dtype(r)) == (op, model, n, dtype)]
        for provider in dict.fromkeys(r["provider"] for r in same):
            full = idx.get((op, model, n, dtype, "full", provider))
            fwd = idx.get((op, model, n, dtype, "forward", provider))
            if full is None or provider == baseline:
                continue
            bwd = f"{full['time_s'] - fwd['time_s']:.3f} s" if fwd else "–"
            speed = base["time_s"] / full["time_s"]
            flag = f" **slower than {baseline}**" if speed < 1.0 else ""
            lines.append(f"| {op} | {model} | {n} | {dtype} | {provider} | {full['time_s']:.3f} s | {bwd} | "
                         f"{speed:.2f}x{flag} | {full['peak_above_inputs_mb']:.0f} MB | "
                         f"{base['peak_above_inputs_mb'] / max(full['peak_above_inputs_mb'], 1.0):.1f}x |")
    return "\n".join(lines)


def glance_table(rows) -> str:
    """One line per (op, model, N, dtype): naive's and each vlmfast provider's full time and peak, which path
    vlmfast ran (one pass or recompute), and vlmfast's default path (native on a CPU, Triton on a GPU) against
    naive in the same dtype (docs/measured.md's table)."""
    idx = _index(rows)
    order = ("vlmfast-chunked", "vlmfast-native", "vlmfast-triton")  # the default path last: native, Triton
    ours = sorted({r["provider"] for r in rows if r["provider"] in order}, key=order.index)
    if not ours:
        return ""
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    lines = [f"| op | path | head (H x V) | N | dtype | naive | {' | '.join(ours)} | {ours[-1]} vs naive: time, peak |",
             "|---" * (6 + len(ours) + 1) + "|"]
    for op, model, n, dtype in dict.fromkeys((r["op"], r["model"], r["n"], _dtype(r)) for r in rows):
        base = idx.get((op, model, n, dtype, "full", "naive"))
        cells = [idx.get((op, model, n, dtype, "full", p)) for p in ours]
        if base is None:
            continue
        h, v = cells[-1]["h"] if cells[-1] else base["h"], base["v"]
        path = "one pass" if registry.runs_one_pass(op, ours[-1], h) else "recompute"
        ratio = "-"
        if cells[-1]:
            speed = base["time_s"] / cells[-1]["time_s"]
            ratio = (f"{speed:.2f}x{' (slower)' if speed < 1 else ''}, "
                     f"{base['peak_above_inputs_mb'] / max(cells[-1]['peak_above_inputs_mb'], 1.0):.1f}x less")

        def cell(r):
            return f"{r['time_s']:.2f} s, {r['peak_above_inputs_mb']:.0f} MB" if r else "-"

        lines.append(f"| {op} | {path} | {h} x {v} | {n} | {names.get(dtype, dtype)} | {cell(base)} | "
                     + " | ".join(cell(r) for r in cells) + f" | {ratio} |")
    return "\n".join(lines)


def slower_than_naive(rows) -> list[str]:
    """vlmfast's (op, model, N, dtype, provider) cases whose full time is above naive's in the same dtype."""
    idx = _index(rows)
    out = []
    for r in rows:
        base = idx.get((r["op"], r["model"], r["n"], _dtype(r), "full", "naive"))
        if r["mode"] == "full" and r["provider"].startswith("vlmfast") and base and r["time_s"] > base["time_s"]:
            out.append(f"{r['op']} {r['model']} N={r['n']} {_dtype(r)} {r['provider']} "
                       f"({base['time_s'] / r['time_s']:.2f}x)")
    return out


def roofline(rows, peak_tflops: float, label: str) -> str:
    """GEMM-bound time at the device's peak vs measured, for vlmfast's providers."""
    lines = [f"| op | model | N | mode | provider | GEMM-bound time at {peak_tflops:.2f} TFLOP/s | measured | "
             "fraction of the limit |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["provider"].startswith("vlmfast") or r["op"] not in ("sft", "token_stats"):
            continue
        if str(r.get("device", "")).startswith("cpu") and _dtype(r) != "float32":  # the CPU peak: its fp32 GEMM
            continue
        mode = "forward" if r["mode"] == "forward" else "full"
        one_pass = registry.runs_one_pass(r["op"], r["provider"], r["h"])
        bound = registry.matmul_flops(counted_tokens(r["n"]), r["h"], r["v"], mode, one_pass=one_pass)  # no teacher
        bound /= peak_tflops * 1e12
        lines.append(f"| {r['op']} | {r['model']} | {r['n']} | {r['mode']} | {r['provider']} | {bound:.3f} s | "
                     f"{r['time_s']:.3f} s | {bound / r['time_s']:.2f} |")
    lines.append(f"\nFLOPs counted: 2NHV forward; forward+backward 8NHV for token_stats (logits recomputed in the "
                 f"backward), 6NHV for sft in one pass (gradients in the forward: the chunked backend, Triton's from "
                 f"H = {TRITON_MIN_HIDDEN}); N the "
                 f"tokens a loss counts (the prompt's are ignored); peak: {label}.")
    return "\n".join(lines)


def gpu_static_report() -> str:
    """Registers, spills, shared memory, wgmma shapes, TMA and occupancy of every Triton kernel compiled for
    sm_90 as the JIT specialises it for the 7B head."""
    try:
        from vlmfast.kernels.inspect import report
    except ImportError as e:
        return f"(not available: {e})"
    try:
        rows = report(archs=(90,))
    except Exception as e:  # compiling needs triton's bundled ptxas: say why it is missing, do not fail the bench
        return f"(compile failed: {type(e).__name__}: {e})"
    if not rows:
        return "(no kernels compiled)"
    keys = ["kernel", "config", "arch", "specialization", "num_warps", "num_stages", "registers", "spill_stores",
            "spill_loads", "shared", "wgmma_shapes", "tma", "ctas_per_sm", "waves"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def e2e_table(e2e) -> str:
    lines = ["| stage step | losses | tokens/s | step time | peak memory |", "|---|---|---|---|---|"]
    for r in e2e:
        lines.append(f"| {r['stage']} | {r['provider']} | {r['tokens_per_s']:.0f} | {r['time_s'] * 1e3:.0f} ms | "
                     f"{r['peak_mb']:.0f} MB |")
    return "\n".join(lines)


def _slower_line(rows) -> str:
    slow = slower_than_naive(rows)
    if not slow:
        return "No vlmfast case is slower than naive in the same dtype."
    return (f"**{len(slow)} vlmfast case(s) slower than naive in the same dtype:** " + "; ".join(slow) + ".")


def write_summary(rows, out: Path, device: str, *, cpu_peak_tflops: float | None = None, e2e=None,
                  grpo_step=None) -> Path:
    rows = [r for r in rows if "error" not in r]  # failed cases are rows of their own in the .jsonl
    out.mkdir(parents=True, exist_ok=True)
    figs = plots(rows, out, device)
    env = rows[0] if rows else {}
    parts = [f"# Benchmark summary: {device}", "",
             f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; liger-kernel "
             f"{env.get('liger_kernel')}; {env.get('timestamp', '')}. Every provider was checked against the naive "
             "result in the same dtype (loss and both gradients) before timing; `full` = forward + backward, "
             "backward = full - forward; peak = peak memory above the inputs.", "",
             "## At a glance", "", glance_table(rows), "",
             "## vs naive (materialised logits)", "", _slower_line(rows), "", ratio_table(rows, "naive"), ""]
    if any(r["provider"] == "liger" for r in rows):
        parts += ["## vs Liger-Kernel", "", ratio_table(rows, "liger"), ""]
    if any(r["provider"] == "vlmfast-native" for r in rows):
        pair = [r for r in rows if r["provider"] in ("vlmfast-chunked", "vlmfast-native")]
        parts += ["## Native CPU epilogue vs the PyTorch epilogue (both the chunked backend)", "",
                  ratio_table(pair, "vlmfast-chunked"), ""]
    if device == "cuda":
        name = env.get("device", "")
        peak = next((v for k, v in registry.GPU_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            parts += ["## Roofline", "", roofline(rows, peak, f"{name}, dense bf16"), ""]
    elif cpu_peak_tflops:
        parts += ["## Roofline", "", roofline(rows, cpu_peak_tflops, "this CPU's fp32 torch.mm throughput, measured"),
                  ""]
    if e2e:
        parts += ["## End to end: one stage step on the tiny model", "", e2e_table(e2e), "",
                  "The tiny model's vocabulary is 512 tokens: there the head is a small part of the step, so "
                  "this shows the overhead of the fused losses, not their gain (which grows with V·N).", ""]
    if grpo_step:
        from .grpo_step import report

        parts += ["## End to end: the whole GRPO step by phase, vs TRL", "",
                  report(grpo_step).split("\n", 2)[2], ""]  # without its title line
    parts += ["## Static GPU report (Triton kernels compiled for sm_90, no GPU needed)", "", gpu_static_report(), ""]
    parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figs] + [""]
    path = out / f"summary_{device}.md"
    path.write_text("\n".join(parts))
    return path
