"""The CPU's bf16 GEMM is chosen by what the CPU has, in one function (native.choose_wide_gemm): AMX tiles go to
ATen's brgemm (oneDNN's AMX kernels), AVX512-BF16 alone to vlmfast's vdpbf16ps kernel, anything else to brgemm;
the native library follows the rule on this machine."""

import pytest
import torch

from vlmfast.ops import native

SAPPHIRE_RAPIDS = {"avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN5 = {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}
ZEN3 = {"avx2", "fma"}


@pytest.mark.parametrize("flags, want", [(SAPPHIRE_RAPIDS, "brgemm"), (ZEN5, "avx512_bf16"), (ZEN3, "brgemm"),
                                         ({"amx_tile", "avx512_bf16"}, "avx512_bf16"), (set(), "brgemm")],
                         ids=["xeon-amx", "zen5", "zen3", "amx-tiles-without-bf16", "unknown"])
def test_rule_names_the_backend_from_the_flags(flags, want):
    assert native.choose_wide_gemm(flags) == want


@pytest.mark.skipif(not native.wide_gemm(torch.bfloat16), reason="needs the built native library")
def test_this_machine_runs_what_the_rule_names(monkeypatch):
    want = native.choose_wide_gemm(native.cpu_flags())
    if "VLMFAST_WIDE_GEMM" not in __import__("os").environ or want == "brgemm":
        assert native.wide_gemm_path(torch.bfloat16) == want
    monkeypatch.setenv("VLMFAST_WIDE_GEMM", "brgemm")  # the override still wins
    assert native.wide_gemm_path(torch.bfloat16) == "brgemm"
