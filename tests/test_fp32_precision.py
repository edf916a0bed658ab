"""fp32 inputs follow one precision rule in every kernel and GEMM of a fused call (vlmfast/ops/precision.py): torch's
own matmuls inside token_stats and token_loss run IEEE fp32, as the Triton kernels' dots do, whatever torch's
TF32 / bf16 flags say outside; the flags are put back after. On a GPU, mixing them made token_stats (a rollout's
old log-probs) and token_loss (the update) disagree by TF32's error. Here every aten matmul of the calls is
recorded with the precision flags it ran under (CUDA's and oneDNN's, both global), with torch set to "medium"
(TF32 on CUDA, bf16 in oneDNN) around the calls, on the chunked backend and Triton's (interpreter), above and
below one_pass.TRITON_MIN_HIDDEN (the one pass's logits are a torch GEMM there)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlmfast

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.mm.out, torch.ops.aten.addmm.out, torch.ops.aten.mm.dtype, torch.ops.aten.addmm.dtype_out}


class MatmulPrecisions(TorchDispatchMode):
    """(input dtype, CUDA's and oneDNN's fp32 precision) at every aten matmul."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            self.seen.append((dtype, torch.backends.cuda.matmul.fp32_precision,
                              torch.backends.mkldnn.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def medium_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


def _problem(N, H, V, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return h, W, y


def _calls(h, W, y, backend):
    """A rollout's statistics (no grad), token_stats fwd+bwd, token_loss fwd+bwd: every GEMM of the fused ops."""
    with torch.no_grad():
        old = vlmfast.token_stats(h, W, y, backend=backend).logp
    s = vlmfast.token_stats(h, W, y, outputs=("logp", "entropy"), backend=backend)
    (s.logp.sum() + 0.1 * s.entropy.sum()).backward()
    loss, new = vlmfast.token_loss(h, W, y, lambda st, i: -(st["logp"] - old.reshape(-1)[i]).exp(), backend=backend)
    loss.backward()
    return old, new.logp


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("H", [48, 2048], ids=["token-stats-kernels", "one-pass"])
def test_fp32_matmuls_run_ieee_inside_the_ops_and_the_flags_come_back(backend, H, medium_precision, monkeypatch):
    from vlmfast.ops import chunked

    # the native CPU kernels have their own fp32 GEMMs: the chunked backend's torch path here
    monkeypatch.setattr(chunked, "_native_ok", lambda *a, **k: False)
    h, W, y = _problem(37, H, 1000, torch.float32)
    with MatmulPrecisions() as rec:
        old, new = _calls(h, W, y, backend)
    fp32 = [(cuda, onednn) for dtype, cuda, onednn in rec.seen if dtype == torch.float32]
    assert fp32, "no fp32 matmul was recorded: the test would pass whatever the rule"
    assert set(fp32) == {("ieee", "ieee")}, fp32
    # torch's setting outside the calls, read through the API the user set it with
    assert torch.get_float32_matmul_precision() == "medium"
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == ("tf32", "bf16")
    # a GRPO update's first ratio, exp(logp - old logp), is 1 (to fp32 rounding: two algorithms, one precision)
    ratio = (new - old).exp()[y != -100]
    assert (ratio - 1).abs().max() < 1e-5


def test_16bit_inputs_leave_torchs_flags_alone(medium_precision):
    h, W, y = _problem(37, 48, 1000, torch.float16)
    with MatmulPrecisions() as rec:
        vlmfast.token_stats(h, W, y, backend="chunked").logp.sum().backward()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert all(cuda == "tf32" for _, cuda, _ in rec.seen)


def test_a_failing_call_puts_the_flags_back(medium_precision):
    from vlmfast.ops.precision import ieee_fp32_matmuls

    with pytest.raises(RuntimeError), ieee_fp32_matmuls(torch.float32):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        raise RuntimeError("a kernel failed")
    assert torch.get_float32_matmul_precision() == "medium"
