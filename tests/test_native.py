"""The native CPU epilogue (kernels/cpu/token_stats.cpp via vlmfast.ops.native) against an fp64
reference on odd shapes: every output and the logits gradient, every KL mode, fp32/bf16/fp16,
ignored rows, extreme logits, running maxima that move from block to block, in-place gradients;
plus the torch.library registrations (opcheck, torch.compile), the errors, and the fallback.

The whole suite also runs on the fallback in CI (`make test-fallback`, VLMFAST_NATIVE=0)."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vlmfast import token_stats, token_stats_from_logits
from vlmfast.ops import native
from vlmfast.ops.reference import reference_token_stats

HAVE_TOOLCHAIN = shutil.which("cmake") is not None and shutil.which(os.environ.get("CXX", "c++")) is not None
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built (checked below)")
MODES = [None, "reverse", "forward"]
SHAPES = [(37, 1000), (5, 2049), (9, 5000)]  # 2049 and 5000 cross the kernel's 2048-column blocks
INV_T = 1 / 0.7


def test_extension_is_built_where_a_toolchain_exists():
    """`make test` on a machine with a compiler must exercise the native path, not skip it."""
    if not HAVE_TOOLCHAIN:
        pytest.skip("no C++ compiler / CMake here: the fallback is what runs")
    if os.environ.get("VLMFAST_NATIVE", "1") == "0":
        assert not native.available() and not native.enabled()  # the fallback run: not even loaded
        return
    assert native.available() and native.enabled(), native._LOAD_ERROR


def _problem(R, V, kl, dtype, scale=3.0, n_ignored=2):
    z = (torch.randn(R, V) * scale).to(dtype)
    zt = (torch.randn(R, V) * scale).to(dtype) if kl else None
    y = torch.randint(0, V, (R,))
    y[torch.randperm(R)[:n_ignored]] = -100
    return z, zt, y


def _reference(z, zt, y, kl, inv_t=INV_T, dtype=torch.float64):
    """lse, logp, entropy (kl, lse_t) per row from the naive reference in `dtype`; ignored rows 0."""
    return reference_token_stats(None, None, None, y, logits=z, teacher=zt if kl else None, kl=kl,
                                 temperature=1 / inv_t, dtype=dtype, teacher_lse=True)


def _native_stats(z, zt, y, kl, inv_t=INV_T):
    return native.block_stats(z, y, zt, inv_t=inv_t, kl=kl, ignore_index=-100)


@needs_native
@pytest.mark.parametrize("kl", MODES)
@pytest.mark.parametrize("R,V", SHAPES)
def test_block_stats_fp32_match_fp64(R, V, kl):
    z, zt, y = _problem(R, V, kl, torch.float32)
    out, ref = _native_stats(z, zt, y, kl), _reference(z, zt, y, kl)
    assert set(out) == set(ref)
    for k, r in ref.items():
        assert out[k].dtype == torch.float32
        torch.testing.assert_close(out[k].double(), r, atol=3e-5 * max(1.0, r.abs().max().item()), rtol=0,
                                   msg=k)
    assert (out["logp"] <= 1e-6).all() and (out["entropy"] >= -1e-6).all()
    assert (out["entropy"] <= math.log(V) + 1e-4).all()
    if kl:
        assert (out["kl"] >= -1e-5).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl", MODES)
def test_block_stats_low_precision_no_worse_than_naive(dtype, kl):
    """16-bit logits: the kernel (fp32 math) is no worse than log_softmax in the same dtype,
    both against fp64 math on the same rounded inputs."""
    z, zt, y = _problem(37, 1000, kl, dtype)
    out = _native_stats(z, zt, y, kl)
    truth, naive = _reference(z, zt, y, kl), _reference(z, zt, y, kl, dtype=dtype)
    for k, t in truth.items():
        err = (out[k].double() - t).abs().max().item()
        naive_err = (naive[k].double() - t).abs().max().item()
        assert err <= naive_err + 1e-4 * max(1.0, t.abs().max().item()), (k, err, naive_err)


@needs_native
@pytest.mark.parametrize("kl", MODES)
def test_running_max_moves_across_blocks_and_extreme_logits(kl):
    """Rows whose maximum grows block after block (every rescale path runs), and |z| ~ 1e4."""
    V = 7000
    ramp = torch.linspace(-50, 50, V)
    z = torch.stack([ramp, ramp.flip(0), torch.randn(V) * 1e4, ramp * 200, torch.randn(V), ramp + 3])
    zt = torch.stack([ramp.flip(0), ramp, torch.randn(V) * 1e4, torch.randn(V), ramp * 150, ramp]) if kl else None
    y = torch.tensor([V - 1, 0, 17, 5, V // 2, 1])
    out, ref = _native_stats(z, zt, y, kl, inv_t=1.0), _reference(z, zt, y, kl, inv_t=1.0)
    for k, r in ref.items():
        assert torch.isfinite(out[k]).all(), k
        # logp/lse/kl carry |z| ~ 1e4 (fp32 ulp ~1e-3); entropy is shift-free and stays tight
        atol = 1e-3 if k == "entropy" else 5e-6 * max(1.0, r.abs().max().item()) + 1e-3
        torch.testing.assert_close(out[k].double(), r, atol=atol, rtol=0, msg=k)


def _reference_grad(z, zt, y, kl, grads, inv_t=INV_T):
    """d(sum_k g_k * out_k)/dz by fp64 autograd."""
    zz = z.double().requires_grad_()
    ref = _reference(zz, zt, y, kl, inv_t=inv_t)
    loss = sum((ref[k] * grads[k].double()).sum() for k in ("logp", "entropy", "lse") + (("kl",) if kl else ()))
    return torch.autograd.grad(loss, zz)[0]


def _stats_for_grad(z, zt, y, kl):
    return {k: v.float() for k, v in _reference(z, zt, y, kl).items()}


@needs_native
@pytest.mark.parametrize("kl", MODES)
@pytest.mark.parametrize("R,V", SHAPES)
def test_block_grad_fp32_matches_fp64_autograd(R, V, kl):
    z, zt, y = _problem(R, V, kl, torch.float32)
    grads = {k: torch.randn(R) for k in ("logp", "entropy", "kl", "lse")}
    ref = _reference_grad(z, zt, y, kl, grads)
    out = torch.full_like(z, float("nan"))
    native.block_grad_(z, y, zt, _stats_for_grad(z, zt, y, kl), grads, out, inv_t=INV_T, kl=kl, ignore_index=-100)
    torch.testing.assert_close(out.double(), ref, atol=2e-6 * max(1.0, ref.abs().max().item()), rtol=0)
    assert (out[y == -100] == 0).all()  # ignored rows: zero gradient, every column written
    # in place over z gives the same bits
    z2 = z.clone()
    native.block_grad_(z2, y, zt, _stats_for_grad(z, zt, y, kl), grads, z2, inv_t=INV_T, kl=kl, ignore_index=-100)
    assert torch.equal(z2, out)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl", MODES)
def test_block_grad_low_precision_no_worse_than_naive(dtype, kl):
    R, V = 37, 1000
    z, zt, y = _problem(R, V, kl, dtype)
    grads = {k: torch.randn(R) for k in ("logp", "entropy", "kl", "lse")}
    truth = _reference_grad(z, zt, y, kl, grads)
    zn = z.clone().requires_grad_()  # naive: the same formulas by autograd in the 16-bit dtype
    naive = _reference(zn, zt, y, kl, dtype=dtype)
    keys = ("logp", "entropy", "lse") + (("kl",) if kl else ())
    naive_grad = torch.autograd.grad(sum((naive[k] * grads[k].to(dtype)).sum() for k in keys), zn)[0]
    out = torch.empty_like(z)
    native.block_grad_(z, y, zt, _stats_for_grad(z, zt, y, kl), grads, out, inv_t=INV_T, kl=kl, ignore_index=-100)
    assert out.dtype == dtype
    err = (out.double() - truth).abs().max().item()
    naive_err = (naive_grad.double() - truth).abs().max().item()
    assert err <= naive_err + 2 * torch.finfo(dtype).eps * max(1.0, truth.abs().max().item()), (err, naive_err)


@needs_native
def test_token_stats_native_and_pytorch_paths_agree(monkeypatch):
    """The full op (matmul + epilogue, forward and backward, teacher, bias, ignored tokens) gives the
    same numbers on both paths of the chunked backend, and the native path is really taken."""
    N, H, V = 41, 24, 3001
    h, W, b = torch.randn(N, H), torch.randn(V, H) / 3, torch.randn(V)
    y = torch.randint(0, V, (N,))
    y[:3] = -100
    teacher = (torch.randn(N, 16), torch.randn(V, 16) / 3)
    g = torch.randn(3, N)
    results, calls = {}, []
    real = native.block_grad_
    monkeypatch.setattr(native, "block_grad_", lambda *a, **k: calls.append(1) or real(*a, **k))
    for flag in ("1", "0"):
        monkeypatch.setenv("VLMFAST_NATIVE", flag)
        calls.clear()
        for kl in ("reverse", "forward"):
            leaves = [t.clone().requires_grad_() for t in (h, W, b)]
            r = token_stats(leaves[0], leaves[1], y, bias=leaves[2], teacher=teacher, kl=kl, temperature=0.8,
                            outputs=("logp", "entropy", "kl"), backend="chunked")
            loss = (g[0] * r.logp + g[1] * r.entropy + g[2] * r.kl).sum()
            results[flag, kl] = [r.logp, r.entropy, r.kl, *torch.autograd.grad(loss, leaves)]
        assert bool(calls) == (flag == "1")
    for kl in ("reverse", "forward"):
        for a, b_ in zip(results["1", kl], results["0", kl]):
            torch.testing.assert_close(a, b_, atol=2e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_from_logits_native_writes_the_gradient_in_the_input_dtype(dtype, monkeypatch):
    z = (torch.randn(2, 13, 900) * 2).to(dtype)
    y = torch.randint(0, 900, (2, 13))
    y[1, 10:] = -100
    res = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("VLMFAST_NATIVE", flag)
        x = z.clone().requires_grad_()
        r = token_stats_from_logits(x, y, outputs=("logp", "entropy"))
        (r.logp.sum() + 0.3 * r.entropy.sum()).backward()
        assert x.grad.dtype == dtype
        res[flag] = (r.logp, r.entropy, x.grad.float())
    for a, b in zip(res["1"], res["0"]):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@needs_native
@pytest.mark.parametrize("kl", MODES)
def test_opcheck_schema_fake_and_autograd_registration(kl):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd formula, AOT dispatch."""
    z, zt, y = _problem(7, 300, kl, torch.float32)
    mode = native.KL_MODES[kl]
    torch.library.opcheck(torch.ops.vlmfast.token_stats_block, (z.requires_grad_(), y, zt, INV_T, mode, -100))
    stats = _stats_for_grad(z.detach(), zt, y, kl)
    gs = [torch.randn(7) for _ in range(4)]
    args = (z.detach(), y, zt, stats["lse"], stats["entropy"], stats.get("kl", torch.zeros(7)),
            stats.get("lse_t", torch.zeros(7)), *gs, INV_T, mode, -100, 0, torch.empty(7, 300))
    torch.library.opcheck(torch.ops.vlmfast.token_stats_block_grad, args)


@needs_native
def test_autograd_through_the_registered_op_matches_fp64():
    z, zt, y = _problem(11, 700, "reverse", torch.float32)
    x = z.clone().requires_grad_()
    lse, logp, entropy, kl, _ = torch.ops.vlmfast.token_stats_block(x, y, zt, INV_T, 1, -100)
    grads = {"logp": torch.randn(11), "entropy": torch.randn(11), "kl": torch.randn(11), "lse": torch.zeros(11)}
    (grads["logp"] * logp + grads["entropy"] * entropy + grads["kl"] * kl).sum().backward()
    ref = _reference_grad(z, zt, y, "reverse", grads)
    # stats from the fp32 forward (not fp64 as above): the tolerance of the token_stats tests
    torch.testing.assert_close(x.grad.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@needs_native
def test_torch_compile_sees_the_op_without_graph_breaks():
    z, _, y = _problem(9, 500, None, torch.float32)

    def f(x):
        lse, logp, entropy, _, _ = torch.ops.vlmfast.token_stats_block(x, y, None, INV_T, 0, -100)
        return (logp - 0.1 * entropy).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out1, out2 = f(x1), compiled(x2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out2, out1)
    torch.testing.assert_close(x2.grad, x1.grad)


@needs_native
def test_torch_compile_traces_the_public_op_over_vocabulary_blocks():
    """token_stats on the native path keeps a running state across vocabulary blocks (token_stats_new_state, a
    factory): torch.compile traces it (its fake) and the compiled values and gradients are eager's, against a naive
    fp64 reference."""
    from vlmfast.ops import token_stats

    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(37, 24, generator=g), torch.randn(1000, 24, generator=g) * 0.3
    y = torch.randint(0, 1000, (37,), generator=g)
    y[::4] = -100

    def f(x):
        r = token_stats(x, W, y)
        return r.logp.sum() - 0.1 * r.entropy.sum()

    compiled = torch.compile(f, backend="aot_eager")
    x1, x2 = h.double().requires_grad_(), h.clone().requires_grad_()
    logp = torch.log_softmax(x1 @ W.double().T, -1)
    keep = y != -100
    ref = (logp.gather(-1, y.clamp(min=0)[:, None])[:, 0] * keep).sum() \
        - 0.1 * (-(logp.exp() * logp).sum(-1) * keep).sum()
    out = compiled(x2)
    ref.backward()
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad.float(), rtol=1e-4, atol=1e-5)


@needs_native
def test_bad_inputs_name_the_problem():
    z, zt, y = _problem(4, 100, "reverse", torch.float32)
    op = torch.ops.vlmfast.token_stats_block
    with pytest.raises(RuntimeError, match="logits must be float32, bfloat16 or float16"):
        op(z.double(), y, None, 1.0, 0, -100)
    with pytest.raises(RuntimeError, match=r"logits must be \[rows, vocab\]"):
        op(z[0], y, None, 1.0, 0, -100)
    with pytest.raises(RuntimeError, match="teacher_logits must match logits"):
        op(z, y, zt[:, :50].contiguous(), 1.0, 1, -100)
    with pytest.raises(RuntimeError, match="teacher_logits must be given exactly when kl_mode"):
        op(z, y, None, 1.0, 1, -100)
    with pytest.raises(RuntimeError, match="target must be a CPU Long tensor of shape"):
        op(z, y.int(), None, 1.0, 0, -100)
    with pytest.raises(RuntimeError, match="target id 100 is outside"):
        op(z, torch.tensor([0, 100, 2, 3]), None, 1.0, 0, -100)
    with pytest.raises(RuntimeError, match="contiguous along the vocabulary"):
        op(z.t().contiguous().t(), y, None, 1.0, 0, -100)


def _import_in_subprocess(env_extra, code="import vlmfast"):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-W", "default", "-c", code], env=env, capture_output=True, text=True,
                          check=True)


def test_missing_library_warns_once_and_falls_back(tmp_path):
    code = ("import torch, vlmfast; from vlmfast.ops import native; import vlmfast.ops.chunked;"
            "r = vlmfast.token_stats(torch.randn(5, 8), torch.randn(30, 8), torch.arange(5));"
            "print(native.available(), native.enabled(), bool((r.logp <= 0).all()))")
    out = _import_in_subprocess({"VLMFAST_NATIVE_LIB": str(tmp_path / "missing.so"), "VLMFAST_NATIVE": "1"}, code)
    assert out.stdout.split() == ["False", "False", "True"]
    assert out.stderr.count("NativeUnavailableWarning") == 1, out.stderr
    assert "missing.so" in out.stderr and "pure-PyTorch" in out.stderr
    quiet = _import_in_subprocess({"VLMFAST_NATIVE_LIB": str(tmp_path / "missing.so"), "VLMFAST_NATIVE": "0"}, code)
    assert "NativeUnavailableWarning" not in quiet.stderr and quiet.stdout.split() == ["False", "False", "True"]


@needs_native
def test_column_blocks_and_row_bands_change_nothing(monkeypatch):
    """The native path's blocks of rows x vocabulary columns (targets in every column block, online
    sums carried across blocks, dz written block by block) give the one-block result."""
    N, H, V = 150, 32, 600
    h, W, b = torch.randn(N, H), torch.randn(V, H) / 2, torch.randn(V)
    y = torch.randint(0, V, (N,))
    y[::7] = -100
    teacher = (torch.randn(N, 16), torch.randn(V, 16) / 2)
    g = torch.randn(3, N)

    def run():
        leaves = [t.clone().requires_grad_() for t in (h, W, b)]
        r = token_stats(leaves[0], leaves[1], y, bias=leaves[2], teacher=teacher, kl="forward", temperature=1.3,
                        outputs=("logp", "entropy", "kl"), backend="chunked")
        loss = (g[0] * r.logp + g[1] * r.entropy + g[2] * r.kl).sum()
        return [r.logp, r.entropy, r.kl, *torch.autograd.grad(loss, leaves)]

    one = run()
    monkeypatch.setattr("vlmfast.ops.chunked.NATIVE_MIN_COLS", 128)
    monkeypatch.setattr("vlmfast.ops.chunked.BLOCK_BYTES", 4 * 64 * 128)  # 64 rows x 128 columns
    from vlmfast.ops.chunked import LinearHead, native_block_shape

    assert native_block_shape(LinearHead(h, W), N) == (64, 128)  # 3 row bands x 5 column blocks
    many = run()
    for a, b_ in zip(many, one):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_a_library_built_for_another_torch_is_never_loaded(tmp_path):
    """Loading runs the op registrations against this torch's ABI: a build for another torch is
    refused from the version stamped in the file, before any loading."""
    fake = tmp_path / "_C.fake.so"
    fake.write_bytes(b"\x7fELF not really a library vlmfast-built-for-torch:1.0.0\0 more bytes")
    code = "import vlmfast; from vlmfast.ops import native; print(native.available())"
    out = _import_in_subprocess({"VLMFAST_NATIVE_LIB": str(fake), "VLMFAST_NATIVE": "1"}, code)
    assert out.stdout.split() == ["False"]
    assert "was built for torch 1.0.0" in out.stderr and "loading" not in out.stderr


@needs_native
def test_the_built_library_says_which_torch_it_is_for():
    assert native._built_for_torch(native.library_path()) == torch.__version__ == torch.ops.vlmfast.torch_version()
