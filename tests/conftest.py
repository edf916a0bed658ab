"""Test set-up: Triton's interpreter must be on before any @triton.jit module is imported, and
nothing may reach a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_native_switch():
    """VLMFAST_NATIVE is read at every op call; a test that sets it (the bench providers do) must
    not change which path the next test runs."""
    from vlmfast.ops.native import keep_native_switch

    with keep_native_switch():
        yield


@pytest.fixture(autouse=True, scope="session")
def _free_deepspeed_shm_buffers():
    """DeepSpeed's CPU shared-memory all-reduce leaves two /dev/shm buffers (tens of MB each) behind for every
    process that initialised it, killed or not: a full run made ~4 GB of them, and a few runs exhaust the
    machine's memory. Remove the ones this session's processes created."""
    from pathlib import Path

    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for f in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
            f.unlink(missing_ok=True)


@pytest.fixture(params=["one band", "bands of 8 rows"])
def bands(request, monkeypatch):
    """token_loss's one pass in one band, or in bands of 8 rows (on the requesting module's vocabulary V): groups
    of tokens larger than that stretch a band (one_pass.GROUP_STRETCH) or fall back to the recompute. Yields (which,
    the band plans token_loss made: None for the recompute)."""
    from vlmfast.ops import chunked, one_pass

    plans, plan = [], one_pass.plan_bands
    monkeypatch.setattr(one_pass, "plan_bands", lambda *a: plans.append(plan(*a)) or plans[-1])
    if request.param != "one band":
        monkeypatch.setattr(one_pass, "MIN_BAND_ROWS", 8)
        monkeypatch.setattr(chunked, "BLOCK_BYTES", 8 * 4 * request.module.V)
    yield request.param, plans


@pytest.fixture(params=["native", "pytorch, W in fp32", "pytorch, 16-bit GEMMs"])
def cpu_16bit_path(request, monkeypatch):
    """The CPU path 16-bit inputs take, forced whatever this CPU is: the native kernels (our 16-bit GEMMs with fp32
    logits; skipped where not built), or the PyTorch epilogue with W copied to fp32 (a CPU without oneDNN's 16-bit
    GEMMs) or with torch's 16-bit GEMMs (chunked.LinearHead.torch_keeps_16bit: logits rounded to the dtype)."""
    from vlmfast.ops import chunked, native

    if request.param == "native":
        if not native.available():
            pytest.skip("native kernels not loaded (not built, or VLMFAST_NATIVE=0 at import)")
        monkeypatch.setenv("VLMFAST_NATIVE", "1")
    else:
        monkeypatch.setenv("VLMFAST_NATIVE", "0")
        monkeypatch.setattr(chunked, "onednn_supports", lambda dtype: request.param.endswith("GEMMs"))
    return request.param
