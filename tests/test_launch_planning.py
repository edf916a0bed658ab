"""The Triton launch planning as a GPU runs it, reached on the CPU: the planners take the device's properties
(a Hopper-shaped target: 132 SMs, sm_90, TMA; an Ampere one: 108 SMs, sm_80) and are driven on edge shapes.
A batch with no counted token plans no work and crashes nowhere (it divided by zero row blocks on a GPU); the
forward's vocabulary slices fill whole waves."""

import math

import pytest
import torch

from vlmfast.kernels.logits_epilogue import stats_splits
from vlmfast.kernels.token_stats import (
    Target,
    _variant_and_config,
    backward_chunk_rows,
    forward_splits,
)

HOPPER, AMPERE = Target(90, 132, tma=True), Target(80, 108)
H = 3584


def rows(n: int, dtype=torch.bfloat16) -> torch.Tensor:
    """[n, H] hidden states without their memory (every row the same storage): planning reads shapes only."""
    return torch.zeros(1, H, dtype=dtype).expand(n, H)


def efficiency(programs: int, sms: int) -> float:
    waves = math.ceil(programs / sms)
    return programs / (waves * sms)


@pytest.mark.parametrize("target", [HOPPER, AMPERE], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_counted_row_plans_one_slice_and_no_crash(target, dtype):
    W = torch.zeros(1, H, dtype=dtype).expand(152064, H)
    assert forward_splits(rows(0, dtype), W, None, target) == 1
    assert stats_splits(0, 152064, target) == 1
    assert backward_chunk_rows(rows(0, dtype), W, None, target) >= 0


@pytest.mark.parametrize("V", [152064, 151937])  # a whole number of 256-wide tiles, and not
@pytest.mark.parametrize("N", [1, 100, 2048, 4096, 8192, 65536])
def test_forward_slices_fill_whole_waves_on_hopper(N, V):
    W = torch.zeros(1, H, dtype=torch.bfloat16).expand(V, H)
    h = rows(N)
    cfg = _variant_and_config("fwd", h, W, None, HOPPER)[1]
    blocks = math.ceil(N / cfg.block_n)
    splits = forward_splits(h, W, None, HOPPER)
    tiles = math.ceil(V / cfg.block_v)
    assert 1 <= splits <= tiles
    per = math.ceil(math.ceil(V / splits) / cfg.block_v) * cfg.block_v
    assert splits == math.ceil(V / per)  # whole tiles per slice
    if blocks * min(tiles // 8, 4 * 132 // blocks + 1) >= 132:  # enough work for a wave
        assert efficiency(blocks * splits, 132) >= 0.9, (blocks, splits)
    if 2048 <= N <= 8192:  # the old rule (2 x SMs programs) left 12-30% of its waves idle here
        old = max(1, min(math.ceil(2 * 132 / blocks), math.ceil(V / (8 * cfg.block_v))))
        assert efficiency(blocks * splits, 132) > efficiency(blocks * old, 132)


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_all_ignored_batch_launches_nothing_and_gives_zero_gradients(backend, monkeypatch):
    """No counted token: zero statistics and gradients from token_stats and token_loss, and no kernel launched."""
    import vlmfast
    from vlmfast.kernels import token_stats as kernels

    launches = []
    monkeypatch.setattr(kernels.Launch, "__call__", lambda self: launches.append(self.kernel))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 32, generator=g, requires_grad=True)
    W = torch.randn(1000, 32, generator=g, requires_grad=True)
    y = torch.full((6,), -100)
    s = vlmfast.token_stats(h, W, y, outputs=("logp", "entropy", "lse"), backend=backend)
    (s.logp.sum() + s.entropy.sum() + s.lse.sum()).backward()
    loss, _ = vlmfast.token_loss(h, W, y, lambda st, index: -st["logp"] - st["entropy"], backend=backend)
    loss.backward()
    assert loss.item() == 0 and not s.logp.any() and not s.entropy.any()
    assert not h.grad.any() and not W.grad.any()
    assert launches == []


def test_a_launch_runs_on_its_tensors_gpu_not_the_current_one(monkeypatch):
    """Inputs on cuda:3 while the current device is 0 (a rank's second model, a teacher on another GPU): the kernel
    is launched inside a device guard for cuda:3 (a recording stand-in for torch.cuda.device)."""
    import contextlib

    from vlmfast.kernels.token_stats import Config, Launch

    entered, ran = [], []

    @contextlib.contextmanager
    def device_guard(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", device_guard)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: ran.append((grid, list(entered)))

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a tensor on cuda:3 without a GPU
        on_gpu3 = torch.empty(4, device="cuda:3")
    Launch(Kernel(), (2, 1), (1.0, on_gpu3), {}, Config(64, 64, 32, 4, 1))()
    assert ran == [((2, 1), [torch.device("cuda", 3)])]


@pytest.mark.parametrize("free_gib,expect_rows", [(None, 3456), (80, 3456), (1, 768), (2**-8, 128)],
                         ids=["unknown", "80GiB-free", "1GiB-free", "4MiB-free"])
def test_dz_chunks_and_bands_shrink_with_the_free_memory(free_gib, expect_rows):
    """The backward's dz chunk and the one pass's band are sized by a quarter of what the GPU has free, capped at
    BWD_DZ_BYTES (1 GiB), whole row tiles, one tile at least: at the 7B head in bf16 (V = 152064) the cap holds 3530
    rows of dz (3456 in whole 128-row tiles), 1 GiB free 256 MiB of them (882: 768), 4 MiB free none (one tile)."""
    from vlmfast.kernels import token_stats as kernels

    V = 152064
    W = torch.zeros(1, H, dtype=torch.bfloat16).expand(V, H)
    free = None if free_gib is None else int(free_gib * 2**30)
    target = Target(90, 132, tma=True, free_bytes=free)
    block_n = _variant_and_config("bwd", rows(8192), W, None, target)[1].block_n
    assert block_n == 128
    allowed = kernels.BWD_DZ_BYTES if free is None else min(kernels.BWD_DZ_BYTES, free // 4)
    assert backward_chunk_rows(rows(8192), W, None, target) == max(block_n, allowed // (2 * V) // block_n * block_n)
    assert backward_chunk_rows(rows(8192), W, None, target) == expect_rows
    assert kernels.scratch_bytes(target) == allowed


def test_the_cuda_target_reads_sms_arch_and_free_memory(monkeypatch):
    """device_target on a GPU, reached through a stand-in for torch.cuda: an H100's 132 SMs and sm_90 (TMA), free
    memory = the driver's free bytes + what torch's caching allocator holds unused; the one pass's bands follow."""
    from vlmfast.kernels import token_stats as kernels
    from vlmfast.ops import one_pass

    GiB = 2**30

    class Props:
        multi_processor_count = 132

    cuda = {"get_device_capability": lambda d: (9, 0), "get_device_properties": lambda d: Props(),
            "mem_get_info": lambda d: (3 * GiB, 80 * GiB), "memory_reserved": lambda d: 2 * GiB,
            "memory_allocated": lambda d: GiB + GiB // 2}
    for name, fn in cuda.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    target = kernels.device_target(torch.device("cuda", 0))
    assert target == Target(90, 132, tma=True, free_bytes=3 * GiB + GiB // 2)
    monkeypatch.setattr(kernels, "device_target", lambda device: target)
    V = 152064
    W = torch.zeros(1, H, dtype=torch.bfloat16).expand(V, H)
    assert one_pass.budget_rows("triton", 8192, rows(8192), W) == (3 * GiB + GiB // 2) // 4 // (4 * V)
