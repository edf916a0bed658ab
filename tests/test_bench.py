"""The benchmark suite's own logic, on a small CPU case: providers agree, a worker measures both
modes, the summary holds the ratio tables and plots (the suite itself runs in `make bench`)."""

import json
import os

import pytest

from bench import providers as P
from bench import registry
from bench.summary import ratio_table, slower_than_naive, write_summary


def test_every_provider_agrees_with_naive_on_every_op(monkeypatch):
    from vlmfast.ops import native

    monkeypatch.setenv("VLMFAST_NATIVE", "1")
    for op in P.OPS:
        agree = P.agreement(op, 64, 1000, n=300)  # odd vocabulary, a partial last sequence
        assert {"naive", "vlmfast-chunked"} <= set(agree)
        assert ("vlmfast-native" in agree) == native.available()  # both CPU epilogues, side by side
        for provider, err in agree.items():
            assert isinstance(err, float) and err < 1e-3, (op, provider, err)
        # the providers switch VLMFAST_NATIVE while they run; the caller's setting comes back
        assert os.environ["VLMFAST_NATIVE"] == "1"


def test_a_wrong_provider_is_caught(monkeypatch):
    orig = P.providers

    def with_bad(op, device):  # a provider 1% off the naive loss
        out = orig(op, device)
        out["bad"] = lambda x: P.naive(op, x) * 1.01
        return out

    monkeypatch.setattr(P, "providers", with_bad)
    assert P.agreement("sft", 64, 500, n=256)["bad"] > 5e-3


def test_flop_counts_and_registry():
    assert registry.matmul_flops(10, 20, 30, "forward") == 2 * 10 * 20 * 30
    assert registry.matmul_flops(10, 20, 30, "full") == 8 * 10 * 20 * 30
    # OPD's fused teacher head: its logits in the forward and again in the backward's recompute
    assert registry.matmul_flops(10, 20, 30, "forward", teacher_h=40) == 2 * 10 * 30 * (20 + 40)
    assert registry.matmul_flops(10, 20, 30, "full", teacher_h=40) == 10 * 30 * (8 * 20 + 4 * 40)
    # one pass: forward, dH, dW; the teacher's logits once
    assert registry.matmul_flops(10, 20, 30, "full", teacher_h=40, one_pass=True) == 10 * 30 * (6 * 20 + 2 * 40)
    # FLOPs are counted over the tokens a loss counts: build() masks each sequence's prompt
    x = P.build("sft", 512, 8, 50)
    assert P.counted_tokens(512) == int((x["labels"] != -100).sum()) == 512 - 2 * P.PROMPT
    assert registry.head("qwen25vl-7b") == (3584, 152064)
    with pytest.raises(SystemExit, match="unknown model"):
        registry.head("gpt-5")


def test_worker_and_summary(tmp_path):
    from bench.suite import measure_case

    res = measure_case("sft", "vlmfast-chunked", 256, 64, 1000, repeats=1, threads=1)
    assert set(res) == {"forward", "full"} and res["full"]["time_s"] > 0
    rows = []
    for provider, t, m in (("naive", 2.0, 400.0), ("vlmfast-chunked", 1.0, 100.0), ("liger", 4.0, 200.0)):
        for mode, f in (("forward", 0.4), ("full", 1.0)):
            rows.append({"op": "grpo", "provider": provider, "model": "cpu-small", "n": 512, "h": 512, "v": 32000,
                         "mode": mode, "time_s": t * f, "peak_above_inputs_mb": m, "device": "cpu (test)",
                         "torch": "x", "liger_kernel": "y", "timestamp": "now"})
    table = ratio_table(rows, "naive")
    line = next(r for r in table.splitlines() if "vlmfast-chunked" in r)
    assert "2.00x" in line and "| 4.0x |" in line and "0.600 s" in line  # backward = full - forward
    path = write_summary(rows, tmp_path, "cpu", cpu_peak_tflops=0.1,
                         e2e=[{"stage": "sft", "provider": "vlmfast", "time_s": 0.1, "tokens_per_s": 5000.0,
                               "peak_mb": 300.0}],
                         grpo_step=[row for v, t, gen in ((0.4, 0.6, 0.2), (0.3, 0.7, 0.1), (0.35, 0.66, 0.15))
                                    for row in ({"provider": "vlmfast", "step_s": v, "generate": gen, "logprobs": 0.0,
                                                 "sync": 0.0, "update": 0.2, "peak_mb": 1000.0, "timestamp": "now",
                                                 "device": "cpu (test)", "torch": "x"},
                                                {"provider": "trl", "step_s": t, "peak_mb": 1100.0})])
    text = path.read_text()
    # three runs each: medians 0.35 s and 0.66 s, the ratio of the medians, the range beside the median
    phases = next(r for r in text.splitlines() if r.startswith("| vlmfast | 0.350 s [0.300, 0.400] | 3 |"))
    assert "| 1.89x | 0.150 s | 0.000 s | 0.000 s | 0.200 s | - | 1000 MB |" in phases
    assert "| trl | 0.660 s [0.600, 0.700] | 3 | 1.00x |" in text
    assert "## vs naive" in text and "## vs Liger-Kernel" in text and "## Roofline" in text
    assert "## End to end" in text and "plots/cpu_grpo_cpu-small.png" in text
    png = (tmp_path / "plots" / "cpu_grpo_cpu-small.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000
    json.dumps(rows)  # rows are JSON rows as written to results/


def test_each_dtype_is_compared_with_naive_in_its_own_dtype_and_slower_cases_are_flagged():
    """fp32 and bf16 rows of the same case: each provider's ratio is to naive in its own dtype (a bf16 naive
    faster than the fp32 one must not make fp32 look slow), and a case below 1.0x is flagged, in its row and
    in the list at the top of the summary."""
    rows = []
    times = {("float32", "naive"): 2.0, ("float32", "vlmfast-native"): 1.0,
             ("bfloat16", "naive"): 0.5, ("bfloat16", "vlmfast-native"): 1.0}
    for (dtype, provider), t in times.items():
        for mode, f in (("forward", 0.4), ("full", 1.0)):
            rows.append({"op": "sft", "provider": provider, "model": "qwen2-0.5b", "n": 512, "h": 896, "v": 151936,
                         "dtype": dtype, "mode": mode, "time_s": t * f, "peak_above_inputs_mb": 100.0,
                         "device": "cpu (test)"})
    table = ratio_table(rows, "naive").splitlines()
    fp32 = next(r for r in table if "| float32 | vlmfast-native |" in r)
    bf16 = next(r for r in table if "| bfloat16 | vlmfast-native |" in r)
    assert "| 2.00x |" in fp32 and "slower" not in fp32
    assert "| 0.50x **slower than naive** |" in bf16
    assert slower_than_naive(rows) == ["sft qwen2-0.5b N=512 bfloat16 vlmfast-native (0.50x)"]
    del rows[0]["dtype"], rows[1]["dtype"]  # naive's fp32 rows as written before the dtype column: fp32
    assert any("| float32 | vlmfast-native | 1.000 s" in r for r in ratio_table(rows, "naive").splitlines())
    assert registry.dtypes_for("cpu", "qwen2-0.5b") == ["float32", "bfloat16"]
    assert registry.dtypes_for("cpu", "cpu-small") == ["float32"] and registry.dtypes_for("cuda", "x") == ["bfloat16"]


def test_a_failing_case_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Out of GPU memory (or a crashed worker) in one case: that case's row says so, the others are measured,
    and every row is on disk as soon as its case ends (a run killed later keeps them)."""
    import argparse

    from bench import suite

    measured = []

    def fake_case(module, argv):
        op, provider, n = argv[:3]
        if provider == "naive":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        rows = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
        measured.append(len(rows))  # the rows of the cases before this one are written already
        return {m: {"time_s": 0.5, "peak_above_inputs_mb": 10.0} for m in ("forward", "full")}

    monkeypatch.setattr(suite, "run_case", fake_case)
    args = argparse.Namespace(device="cpu", threads=1, out=tmp_path, models=["cpu-small"], ops=["sft"], tokens=[256],
                              providers=["naive", "vlmfast-chunked"], tolerance=2e-3, repeats=1, dtypes=None)
    rows = suite.run(args)
    on_disk = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert [r["provider"] for r in on_disk] == ["naive", "vlmfast-chunked", "vlmfast-chunked"]
    assert "out of memory" in on_disk[0]["error"] and measured == [1]
    assert [r["mode"] for r in rows] == ["forward", "full"] and all("error" not in r for r in rows)


def test_glance_table_compares_the_default_path_whatever_the_row_order():
    """docs/measured.md's table: vlmfast's default path (native on a CPU, Triton on a GPU) against naive, named one pass
    or recompute by the op and provider, whichever order the rows came in; nothing without a vlmfast row."""
    from bench.summary import glance_table

    def row(op, provider, t, h=3584):
        return {"op": op, "provider": provider, "model": "m", "n": 2048, "h": h, "v": 152064, "dtype": "bfloat16",
                "mode": "full", "time_s": t, "peak_above_inputs_mb": 100.0 * t}

    gpu = [row("dpo", "vlmfast-triton", 1.0), row("dpo", "naive", 2.0), row("dpo", "vlmfast-chunked", 4.0),
           row("token_stats", "naive", 1.0), row("token_stats", "vlmfast-triton", 2.0, h=896)]
    lines = glance_table(gpu).splitlines()
    assert "| vlmfast-chunked | vlmfast-triton | vlmfast-triton vs naive" in lines[0]
    assert lines[2].startswith("| dpo | one pass | 3584 x 152064 |") and "| 2.00x, 2.0x less |" in lines[2]
    assert lines[3].startswith("| token_stats | recompute |") and "0.50x (slower)" in lines[3]
    cpu = [row("sft", "vlmfast-native", 1.0, 896), row("sft", "vlmfast-chunked", 2.0, 896), row("sft", "naive", 3.0)]
    assert "vlmfast-native vs naive" in glance_table(cpu).splitlines()[0]
    assert glance_table([row("sft", "naive", 1.0), row("sft", "liger", 1.0)]) == ""


def test_on_a_gpu_each_op_runs_in_its_own_process_under_a_deadline(tmp_path):
    """The GPU sweep's isolation, run here on the CPU (the same code; a GPU only changes what a worker times): each
    op's worker appends its rows as its cases finish; an op whose worker is killed at its deadline (a hang, or a
    sticky CUDA error that would poison every later case of the process) leaves a row saying so, and the next op
    still runs in a fresh process."""
    import argparse

    from bench import suite

    def args(**kw):
        base = dict(device="cpu", threads=1, out=tmp_path, models=["cpu-small"], ops=["sft"], tokens=[256],
                    providers=["naive", "vlmfast-chunked"], tolerance=None, repeats=1, dtypes=["float32"],
                    op_timeout=120)
        return argparse.Namespace(**{**base, **kw})

    rows = suite.run_ops_isolated(args())
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("naive", "forward"), ("naive", "full"), ("vlmfast-chunked", "forward"), ("vlmfast-chunked", "full")]
    assert all(r["time_s"] > 0 and r["op"] == "sft" for r in rows)
    killed = suite.run_ops_isolated(args(ops=["sft", "grpo"], op_timeout=0.5))  # not even its imports finish
    assert killed == []
    on_disk = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    errors = [r for r in on_disk if "error" in r]
    assert [r["op"] for r in errors] == ["sft", "grpo"]
    assert all("timed out after 0.5 s" in r["error"] for r in errors)
    assert len(on_disk) == 4 + 2  # the first sweep's rows are kept


def test_the_long_tail_case_ends_each_response_at_its_drawn_length():
    """bench.grpo_step's long_tail case: lengths mostly short, one in 20 at the maximum, and a `generate` in a
    process with the patch ends every row exactly at its drawn length (EOS included), whatever it samples."""
    import random
    import subprocess
    import sys
    from pathlib import Path

    from bench.grpo_step import long_tail_lengths

    drawn = long_tail_lengths(4000, 256, random.Random(1))
    assert 0.75 < sum(n <= 24 for n in drawn) / 4000 < 0.85 and 0.03 < drawn.count(256) / 4000 < 0.07
    code = """
import random, torch
from bench.grpo_step import _force_long_tail, long_tail_lengths
from vlmfast.models import tiny_vlm
_force_long_tail(40)
model, proc = tiny_vlm("student", seed=0)
eos = model.generation_config.eos_token_id
ids = torch.tensor([[5, 6, 7]] * 12)
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=40)[:, 3:]
got = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else 40 for row in out]
print(got == long_tail_lengths(12, 40, random.Random(0)), got)
"""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("True"), r.stdout


@pytest.mark.parametrize("args,says", [(["--providers", "vlmfast-chunkd"], "--providers: vlmfast-chunkd not offered"),
                                       (["--models", "qwen7b"], "argument --models: invalid choice: 'qwen7b'"),
                                       (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
                                       (["--repeats", "-1"], "argument --repeats: must be >= 1")])
def test_bench_mistakes_exit_2_before_anything_runs(args, says, capsys, tmp_path):
    from bench.suite import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--no-e2e", "--out", str(tmp_path)])
    assert e.value.code == 2 and says in capsys.readouterr().err and not any(tmp_path.iterdir())
