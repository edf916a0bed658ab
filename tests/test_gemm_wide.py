"""16-bit GEMMs with an fp32 result (kernels/cpu/gemm_wide.cpp, `native.mm_wide_`) against the fp64 product
of the same 16-bit operands, on odd shapes; and the fused op's 16-bit CPU path that uses them: no fp32 copy
of W, the same numbers whatever the blocks."""

import pytest
import torch

from vlmfast import token_stats
from vlmfast.ops import native

pytestmark = pytest.mark.skipif(not native.wide_gemm(torch.bfloat16),
                                reason="native kernels not built (test_native checks that they are where they can be)")
DTYPES = [torch.bfloat16, torch.float16]


def _fp64_product(a, b):
    return a.double() @ b.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(37, 64, 1000), (5, 2049, 33), (1, 7, 1), (130, 896, 257)])
def test_products_are_summed_and_stored_in_fp32(dtype, M, K, N):
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    truth = _fp64_product(a, b)
    bound = 1e-5 * (a.double().abs() @ b.double().abs()).max().item()  # fp32 summation of K products
    out = torch.full((M, N), float("nan"))
    native.mm_wide_(out, a, b, accumulate=False)
    err = (out.double() - truth).abs().max().item()
    assert err <= bound
    start = torch.randn(M, N)
    acc = native.mm_wide_(start.clone(), a, b, accumulate=True)
    assert (acc.double() - (truth + start.double())).abs().max().item() <= bound + 1e-6
    if K >= 64:  # a 16-bit result is rounded far beyond that: the fp32 store is what the op adds
        assert (torch.mm(a, b).double() - truth).abs().max().item() > 10 * err


def test_row_strides_are_taken_as_leading_dimensions():
    """Operands and result as row slices / column windows of larger buffers (the fused op writes dh and dW
    blocks in place)."""
    big_a, big_b, big_out = torch.randn(20, 50).bfloat16(), torch.randn(40, 90).bfloat16(), torch.zeros(20, 100)
    a, b, out = big_a[3:14, 5:37], big_b[2:34, 10:71], big_out[3:14, 7:68]
    native.mm_wide_(out, a, b, accumulate=False)
    truth = _fp64_product(a, b)
    assert (out.double() - truth).abs().max().item() < 1e-4
    assert big_out[:3].abs().sum() == 0 and big_out[:, :7].abs().sum() == 0 and big_out[:, 68:].abs().sum() == 0


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(3, 4), torch.zeros(3, 5).bfloat16(), torch.zeros(5, 4).bfloat16()), None),
    ((torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(5, 4)), "bfloat16 or both float16"),
    ((torch.zeros(3, 4), torch.zeros(3, 5).bfloat16(), torch.zeros(5, 4).half()), "bfloat16 or both float16"),
    ((torch.zeros(3, 4), torch.zeros(3, 5).bfloat16(), torch.zeros(6, 4).bfloat16()), "do not chain"),
    ((torch.zeros(3, 4).bfloat16(), torch.zeros(3, 5).bfloat16(), torch.zeros(5, 4).bfloat16()), "float32"),
    ((torch.zeros(3, 4), torch.zeros(3, 5).bfloat16(), torch.zeros(4, 5).bfloat16().T), "row-major"),
])
def test_bad_operands_name_the_problem(args, message):
    if message is None:
        native.mm_wide_(*args, accumulate=False)
        return
    with pytest.raises(RuntimeError, match=message):
        native.mm_wide_(*args, accumulate=False)


def _fused(h, W, b, y, teacher, g):
    leaves = [t.clone().requires_grad_() for t in (h, W, b)]
    r = token_stats(leaves[0], leaves[1], y, bias=leaves[2], teacher=teacher, kl="reverse", temperature=0.9,
                    outputs=("logp", "entropy", "kl"), backend="chunked")
    loss = (g[0] * r.logp + g[1] * r.entropy + g[2] * r.kl).sum()
    return [r.logp, r.entropy, r.kl, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_16bit_path_keeps_w_and_blocks_change_nothing(dtype, monkeypatch):
    """16-bit CPU inputs: the head keeps W as given (no fp32 copy), and 3 row bands x 5 column blocks
    (dh summed over column blocks, dW over row bands, in fp32) give the one-block numbers."""
    from vlmfast.ops.chunked import LinearHead, native_block_shape

    N, H, V = 150, 32, 600
    h, W, b = torch.randn(N, H).to(dtype), (torch.randn(V, H) / 2).to(dtype), torch.randn(V).to(dtype)
    y = torch.randint(0, V, (N,))
    y[::7] = -100
    teacher = (torch.randn(N, 16).to(dtype), (torch.randn(V, 16) / 2).to(dtype))
    g = torch.randn(3, N)
    head = LinearHead(h, W)
    assert head.low_precision and head.weight is W
    one = _fused(h, W, b, y, teacher, g)
    monkeypatch.setattr("vlmfast.ops.chunked.NATIVE_MIN_COLS", 128)
    monkeypatch.setattr("vlmfast.ops.chunked.BLOCK_BYTES", 4 * 64 * 128)
    assert native_block_shape(LinearHead(h, W), N) == (64, 128)
    many = _fused(h, W, b, y, teacher, g)
    for x, ref in zip(many, one):
        # fp32 sums in another order, then the 16-bit gradients rounded once: a rounding step apart at most
        torch.testing.assert_close(x.float(), ref.float(), atol=2 * torch.finfo(dtype).eps * ref.abs().max().item(),
                                   rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("src_dtype", ["float32", "same"])
@pytest.mark.parametrize("R,C", [(37, 1000), (1, 33), (65, 31)])
def test_transpose_into_equals_torchs_transpose_and_rounding(dtype, src_dtype, R, C):
    """The GEMMs' transposed operands (W's column block, dz): out = src.T rounded to out's dtype exactly
    as torch rounds (nearest even), from a row window of a larger buffer."""
    big = torch.randn(R + 3, C + 5) * 100
    src = big[2:2 + R, 3:3 + C]
    if src_dtype == "same":
        src = src.to(dtype)
    out = torch.full((C, R), float("nan")).to(dtype)
    native.transpose_into_(out, src)
    assert torch.equal(out, src.T.to(dtype))


def test_transpose_into_names_a_bad_shape():
    with pytest.raises(RuntimeError, match="not the transpose"):
        native.transpose_into_(torch.empty(4, 3).bfloat16(), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        native.transpose_into_(torch.empty(3, 4), torch.zeros(4, 3))
