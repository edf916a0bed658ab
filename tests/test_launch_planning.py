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
