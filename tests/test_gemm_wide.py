"""16-bit GEMMs with an fp32 result (kernels/cpu/gemm_wide.cpp, `native.mm_wide_`) against the fp64 product
of the same 16-bit operands, on odd shapes and every operand layout, through both GEMMs (our vdpbf16ps one,
kernels/cpu/gemm_bf16_avx512.cpp, where the CPU has AVX512-BF16, and ATen's brgemm); and the fused op's
16-bit CPU path that uses them: no fp32 copy of W, the same numbers whatever the blocks."""

import pytest
import torch

from vlmfast import token_stats
from vlmfast.ops import native

pytestmark = pytest.mark.skipif(not native.wide_gemm(torch.bfloat16),
                                reason="native kernels not built (test_native checks that they are where they can be)")
DTYPES = [torch.bfloat16, torch.float16]


def _fp64_product(a, b):
    return a.double() @ b.double()


# (dtype, GEMM): bf16 through ours where this CPU has it, and through brgemm (VLMFAST_WIDE_GEMM=brgemm)
PATHS = [(torch.bfloat16, "brgemm"), (torch.float16, "brgemm")]
if native.wide_gemm_path(torch.bfloat16) == "avx512_bf16":
    PATHS.insert(0, (torch.bfloat16, "avx512_bf16"))


@pytest.fixture(params=PATHS, ids=lambda p: f"{str(p[0])[6:]}-{p[1]}")
def path(request, monkeypatch):
    dtype, gemm = request.param
    if gemm == "brgemm":
        monkeypatch.setenv("VLMFAST_WIDE_GEMM", "brgemm")
    assert native.wide_gemm_path(dtype) == gemm
    return dtype


def _operand(rows, cols, dtype, transposed):
    """A [rows, cols] operand, row-major or as the transposed view of a [cols, rows] tensor (W^T, dz^T)."""
    x = torch.randn(cols, rows).to(dtype).T if transposed else torch.randn(rows, cols).to(dtype)
    assert x.stride(0 if transposed else 1) == 1
    return x


# Shapes past every edge of the blocking: K odd (a lone last k-pair) and past one block of 256 pairs, M past
# one 96-row block and not a multiple of the 12-row tile, N not a multiple of the 32-column panel, N narrow
# enough that the threads split the rows, and single rows / columns.
@pytest.mark.parametrize("M,K,N", [(37, 64, 1000), (5, 2049, 33), (1, 7, 1), (130, 896, 257), (130, 3, 33)])
@pytest.mark.parametrize("layout", ["nn", "nt", "tn", "tt"])
def test_products_are_summed_and_stored_in_fp32(path, M, K, N, layout):
    dtype = path
    a, b = _operand(M, K, dtype, layout[0] == "t"), _operand(K, N, dtype, layout[1] == "t")
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


@pytest.mark.parametrize("transposed", [False, True])
def test_row_strides_are_taken_as_leading_dimensions(path, transposed):
    """Operands and result as row slices / column windows of larger buffers (the fused op writes dh and dW
    blocks in place, and reads W's column block as a transposed window)."""
    big_a, big_b, big_out = torch.randn(20, 50).to(path), torch.randn(40, 90).to(path), torch.zeros(20, 100)
    a, out = big_a[3:14, 5:37], big_out[3:14, 7:68]
    b = big_b.T.contiguous().T[2:34, 10:71] if transposed else big_b[2:34, 10:71]
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
    ((torch.zeros(3, 4), torch.zeros(3, 5).bfloat16(), torch.zeros(10, 8).bfloat16()[::2, ::2]), "transposed view"),
    ((torch.zeros(4, 3).T, torch.zeros(3, 5).bfloat16(), torch.zeros(5, 4).bfloat16()),
     "out must be row-major"),
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
@pytest.mark.parametrize("H", [32, 80], ids=["N > 2H", "N <= 2H"])
def test_fused_16bit_path_keeps_w_and_blocks_change_nothing(dtype, H, monkeypatch):
    """16-bit CPU inputs: the head keeps W as given (no fp32 copy), and 3 row bands x 5 column blocks
    (dh summed over column blocks in fp32; dW summed over row bands in fp32, or, within 2H rows, one GEMM over every
    row's kept 16-bit dz at the end) give the one-block numbers."""
    from vlmfast.ops.chunked import LinearHead, native_block_shape

    N, V = 150, 600
    h, W, b = torch.randn(N, H).to(dtype), (torch.randn(V, H) / 2).to(dtype), torch.randn(V).to(dtype)
    y = torch.randint(0, V, (N,))
    y[::7] = -100
    teacher = (torch.randn(N, 16).to(dtype), (torch.randn(V, 16) / 2).to(dtype))
    g = torch.randn(3, N)
    head = LinearHead(h, W, need_dw=True)
    assert head.low_precision and head.weight is W
    assert head.dw.dtype == dtype  # one band of rows: each dW block rounded straight in, no fp32 [V, H]
    one = _fused(h, W, b, y, teacher, g)
    monkeypatch.setattr("vlmfast.ops.chunked.NATIVE_MIN_COLS", 128)
    monkeypatch.setattr("vlmfast.ops.chunked.BLOCK_BYTES", 4 * 64 * 128)
    assert native_block_shape(LinearHead(h, W), N) == (64, 128)
    three_bands = LinearHead(h, W, need_dw=True)
    keeps_dz = 2 * N <= 4 * H
    assert (three_bands.dz16_rows is not None) is keeps_dz
    assert three_bands.dw.dtype == (dtype if keeps_dz else torch.float32)  # else summed in fp32
    many = _fused(h, W, b, y, teacher, g)
    for x, ref in zip(many, one):
        # fp32 sums in another order, then the 16-bit gradients rounded once: a rounding step apart at most
        torch.testing.assert_close(x.float(), ref.float(), atol=2 * torch.finfo(dtype).eps * ref.abs().max().item(),
                                   rtol=0)


@pytest.mark.parametrize("several_bands", [False, True], ids=["one band", "bands of 8 rows"])
def test_16bit_student_beside_a_teacher_the_native_path_cannot_take(several_bands, monkeypatch):
    """fp64 teacher logits send the whole call to the PyTorch epilogue, so the bf16 student's head must be built for
    it (no native 16-bit dW, no kept dz rows: those are filled by the native path only). token_stats and token_loss
    then give the fp64 truth's gradients to bf16 accuracy, in one band and several (they raised, or left dW zero)."""
    import vlmfast
    from vlmfast.ops import chunked, one_pass

    if several_bands:
        monkeypatch.setattr(one_pass, "MIN_BAND_ROWS", 8)
        monkeypatch.setattr(chunked, "BLOCK_BYTES", 8 * 4 * 500)
    N, H, V = 37, 24, 500  # 2N <= 4H: several bands would keep dz rows
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.4
    y, teacher = torch.randint(0, V, (N,), generator=g), torch.randn(N, V, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (h, W)]
        return [x.double() for x in torch.autograd.grad(fn(*leaves), leaves)]

    def by_stats(hh, ww):
        r = token_stats(hh, ww, y, teacher=teacher, kl="reverse", outputs=("logp", "kl"))
        return (r.logp + r.kl).sum()

    def by_loss(hh, ww):
        return vlmfast.token_loss(hh, ww, y, lambda s, i: s["logp"] + s["kl"], teacher=teacher, kl="reverse")[0]

    for fn in (by_stats, by_loss):
        truth, got = grads(fn, torch.float64), grads(fn, torch.bfloat16)
        for a, t in zip(got, truth):
            assert (a - t).abs().max() <= 2e-2 * t.abs().max(), fn.__name__
