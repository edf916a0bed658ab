"""Every shipped Triton kernel config compiles ahead of time for sm_90 (H100) and sm_80 (A100) on
this CPU machine, with no register spills, shared memory within the limit, and tensor-core
instructions for 16-bit inputs. Runs `python -m vlmfast.kernels.inspect` in a subprocess: the test
session itself runs with the interpreter on, which replaces the compiler."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.aot, pytest.mark.slow]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")))
    res = subprocess.run([sys.executable, "-m", "vlmfast.kernels.inspect", "--json"], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


@pytest.mark.timeout(1600)
def test_every_shipped_config_compiles_for_both_archs(compiled):
    from vlmfast.kernels.inspect import shipped_kernels

    expected = {(k[0], f"sm_{arch}") for arch in (90, 80) for k in shipped_kernels(arch)}
    assert {(r["kernel"], r["arch"]) for r in compiled} == expected
    assert len(expected) == 36  # 12 configs per arch; 16-bit ones in bf16 and fp16


def test_no_register_spills(compiled):
    spilling = [(r["kernel"], r["arch"], r["spill_stores"], r["spill_loads"]) for r in compiled
                if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"register spills: {spilling}"


def test_shared_memory_within_limit(compiled):
    for r in compiled:
        assert 0 < r["shared"] <= r["shared_limit"], r


def test_16bit_kernels_use_tensor_cores(compiled):
    for r in compiled:
        if "fp32" in r["kernel"]:
            continue  # IEEE fp32 dot products: FMA by design
        if r["arch"] == "sm_90":
            assert r["wgmma"], f"{r['kernel']} on sm_90 does not use wgmma"
        else:
            assert r["mma"], f"{r['kernel']} on sm_80 does not use mma"
