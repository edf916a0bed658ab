"""The native CPU epilogue of the chunked backend: `kernels/cpu/token_stats.cpp`, built by CMake
into `vlmfast/_C*.so` at install time and loaded here with `torch.ops.load_library`.

torch.library ops on a block of logits z [R, C] (R token rows, C vocabulary columns starting at
column c0: a slice of h W^T from a BLAS matmul, or given logits), one pass each:

    state = torch.ops.vlmfast.token_stats_new_state(R)                   [R, 9] fp64 online sums
    torch.ops.vlmfast.token_stats_accumulate_(state, z, y, zt, inv_t, kl_mode, ignore_index, c0)
    torch.ops.vlmfast.token_stats_finish(state, y, kl_mode, ignore_index)
        -> lse, logp, entropy, kl, lse_t                                  [R] fp32 each
    torch.ops.vlmfast.token_stats_block(z, y, zt, inv_t, kl_mode, ignore_index)   (C = V: all three)
    torch.ops.vlmfast.token_stats_block_grad(z, y, zt, lse, entropy, kl, lse_t, g_logp, g_entropy,
                                             g_kl, g_lse, inv_t, kl_mode, ignore_index, c0, out)
        writes dz of the block into out (which may be z)

All have fake (meta) kernels and token_stats_block has an autograd formula, so torch.compile and
autograd see them like any aten op. The chunked backend uses them whenever they are built and
`VLMFAST_NATIVE` is not "0"; without them it computes the same thing in pure PyTorch.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import warnings

import torch

STATE_WIDTH = 9  # doubles per row of an OnlineStats state (kernels/cpu/token_stats.cpp kStateWidth)
KL_MODES = {None: 0, "reverse": 1, "forward": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the vlmfast package folder


class NativeUnavailableWarning(UserWarning):
    """The native CPU kernels were not built; vlmfast runs on its pure-PyTorch CPU path."""


def library_path() -> str | None:
    """The built library, or None. `VLMFAST_NATIVE_LIB` points at another build (e.g. cmake's)."""
    override = os.environ.get("VLMFAST_NATIVE_LIB")
    if override:
        return override
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    return found[0] if found else None


def _load() -> str | None:
    """Load the library; return why it could not be, or None on success."""
    path = library_path()
    if path is None:
        return ("vlmfast/_C*.so is missing: vlmfast was installed without a C++ compiler and CMake, or the "
                "build failed (see the pip log); install them and reinstall vlmfast to build it")
    built_for = _built_for_torch(path)
    if built_for is not None and built_for != torch.__version__:  # another torch's C++ ABI: never load it
        return (f"{path} was built for torch {built_for}, this is torch {torch.__version__}; reinstall vlmfast "
                "(`pip install --no-build-isolation -e .`, or `make`) to rebuild it")
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        return f"loading {path} failed: {e}"
    return None


def _built_for_torch(path: str) -> str | None:
    """The torch version the library was compiled against, read from the file without loading it
    (loading runs its op registrations)."""
    try:
        with open(path, "rb") as f:
            found = re.search(rb"vlmfast-built-for-torch:([^\0]+)\0", f.read())
    except OSError:
        return None
    return found.group(1).decode() if found else None


# VLMFAST_NATIVE=0 at import: not even loaded (as on a machine without a compiler); set to 0 later:
# loaded but not used.
_DISABLED = os.environ.get("VLMFAST_NATIVE", "1") == "0"
_LOAD_ERROR = "disabled by VLMFAST_NATIVE=0" if _DISABLED else _load()


def available() -> bool:
    """True when the native ops are built and loaded."""
    return _LOAD_ERROR is None


@contextlib.contextmanager
def keep_native_switch():
    """Put the caller's VLMFAST_NATIVE back afterwards: the switch is read at every forward and backward, and a
    benchmark provider (or a test) that sets it must not decide which path the next one runs."""
    before = os.environ.get("VLMFAST_NATIVE")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLMFAST_NATIVE", None)
        else:
            os.environ["VLMFAST_NATIVE"] = before


def enabled() -> bool:
    """Whether the chunked backend uses them now: built, and VLMFAST_NATIVE is not "0"."""
    return available() and os.environ.get("VLMFAST_NATIVE", "1") != "0"


if _LOAD_ERROR is not None and not _DISABLED:
    warnings.warn(
        f"vlmfast: native CPU kernels unavailable ({_LOAD_ERROR}); the fused ops run on the pure-PyTorch "
        "chunked path (same results, slower on CPU). Set VLMFAST_NATIVE=0 to silence this.",
        NativeUnavailableWarning,
        stacklevel=2,
    )


def usable(*blocks: torch.Tensor | None) -> bool:
    """Whether the native ops can take these logits blocks (CPU, fp32/bf16/fp16, rows contiguous)."""
    return enabled() and all(
        b is None or (b.device.type == "cpu" and b.dtype in _DTYPES and b.dim() == 2 and b.stride(1) == 1)
        for b in blocks
    )


def wide_gemm(dtype: torch.dtype) -> bool:
    """Whether `mm_wide_` (kernels/cpu/gemm_wide.cpp) takes operands of `dtype`: 16-bit, built (a
    library from before it lacks the op) and enabled."""
    return (dtype in (torch.bfloat16, torch.float16) and enabled()
            and hasattr(torch.ops.vlmfast, "wide_gemm_path"))


def mm_wide_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """out (+)= a @ b: 16-bit a [M, K] and b [K, N], each row-major or a transposed view, products summed and
    stored in fp32 out [M, N] (row-major)."""
    torch.ops.vlmfast.mm_wide_(out, a, b, accumulate)
    return out


def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo, up to its flags (model name, cpu family, ...; empty where
    there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if key.strip() == "flags":
                    break
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo has none)."""
    return set(cpu_info().get("flags", "").split())


def choose_wide_gemm(flags: set[str]) -> str:
    """The bf16 GEMM with an fp32 result for a CPU with these flags: the rule, in one place.

    - AMX tiles (amx_bf16 and amx_tile: Intel Xeon from Sapphire Rapids): "brgemm", ATen's cpublas::brgemm, which
      runs them through oneDNN (1.87 s for token_stats fwd+bwd at N=1024, H=896, V=151936 where our vdpbf16ps
      kernel took 6.48 s, on a Xeon with AMX: docs/platform.md);
    - AVX512-BF16 without AMX (AMD Zen 4/5, Intel Cooper Lake): "avx512_bf16", ours (vdpbf16ps);
    - neither: "brgemm" (fp32 speed; the PyTorch fallback may still run oneDNN's bf16 GEMMs, chunked.onednn_supports).
    """
    if {"amx_bf16", "amx_tile"} <= flags:
        return "brgemm"
    return "avx512_bf16" if "avx512_bf16" in flags else "brgemm"


def _pick_wide_gemm() -> None:
    """The native GEMM follows choose_wide_gemm unless VLMFAST_WIDE_GEMM says otherwise (the C++ reads the variable
    per call: "brgemm" turns its AVX512-BF16 kernel off)."""
    if "VLMFAST_WIDE_GEMM" not in os.environ and choose_wide_gemm(cpu_flags()) == "brgemm":
        os.environ["VLMFAST_WIDE_GEMM"] = "brgemm"


_pick_wide_gemm()


def wide_gemm_path(dtype: torch.dtype) -> str:
    """Which GEMM `mm_wide_` runs for `dtype` on this CPU: "avx512_bf16" (ours, vdpbf16ps), "brgemm"
    (ATen's, fp32 speed without AMX; VLMFAST_WIDE_GEMM=brgemm forces it) or "none" (not 16-bit)."""
    return torch.ops.vlmfast.wide_gemm_path(dtype) if wide_gemm(dtype) else "none"


def _same_dtype(z, zt):
    """The kernels read student and teacher blocks as one dtype: widen both when they differ."""
    if zt is None or zt.dtype == z.dtype:
        return z, zt
    return z.float(), zt.float()


def _outputs(lse, logp, entropy, kl_out, lse_t, teacher: bool) -> dict:
    out = {"lse": lse, "logp": logp, "entropy": entropy}
    if teacher:
        out.update(kl=kl_out, lse_t=lse_t)
    return out


def block_stats(z, target, zt, *, inv_t: float, kl: str | None, ignore_index: int) -> dict:
    """Per-row lse, logp, entropy (+ kl, lse_t with a teacher block) of one full-vocabulary block."""
    z, zt = _same_dtype(z, zt)
    res = torch.ops.vlmfast.token_stats_block(z, target.to(torch.int64), zt, inv_t,
                                              KL_MODES[kl] if zt is not None else 0, ignore_index)
    return _outputs(*res, teacher=zt is not None)


class OnlineStats:
    """Per-row statistics over the vocabulary fed in column blocks: `add` each block [R, C] of
    logits (and teacher logits) starting at column c0, then `result()`."""

    def __init__(self, target, *, inv_t: float, kl: str | None, teacher: bool, ignore_index: int):
        self.target = target.to(torch.int64)
        self.state = torch.ops.vlmfast.token_stats_new_state(self.target.numel())
        self.inv_t, self.mode, self.ignore_index = inv_t, KL_MODES[kl] if teacher else 0, ignore_index

    def add(self, z, zt, c0: int) -> None:
        z, zt = _same_dtype(z, zt)
        torch.ops.vlmfast.token_stats_accumulate_(self.state, z, self.target, zt, self.inv_t, self.mode,
                                                  self.ignore_index, c0)

    def result(self) -> dict:
        res = torch.ops.vlmfast.token_stats_finish(self.state, self.target, self.mode, self.ignore_index)
        return _outputs(*res, teacher=self.mode != 0)


def block_grad_(z, target, zt, stats: dict, grads: dict, out, *, inv_t: float, kl: str | None, ignore_index: int,
                col_offset: int = 0):
    """Write dz of one block (columns from `col_offset`) into `out` (z itself for an in-place
    update). `stats` and `grads` hold [R] fp32 rows ("lse", "entropy", "kl", "lse_t"; "logp",
    "entropy", "kl", "lse"); missing gradients are zero. zt=None (or kl=None) drops the KL term."""
    if zt is None or kl is None:
        zt, kl = None, None
    z2, zt = _same_dtype(z, zt)
    target_out = out if z2 is z else torch.empty_like(z2)
    zero = torch.zeros(z.shape[0], dtype=torch.float32)

    def row(d, k):
        v = d.get(k)
        return zero if v is None else v.to(torch.float32).contiguous()

    torch.ops.vlmfast.token_stats_block_grad(
        z2, target.to(torch.int64), zt, row(stats, "lse"), row(stats, "entropy"), row(stats, "kl"), row(stats, "lse_t"),
        row(grads, "logp"), row(grads, "entropy"), row(grads, "kl"), row(grads, "lse"),
        inv_t, KL_MODES[kl], ignore_index, col_offset, target_out)
    if target_out is not out:
        out.copy_(target_out)
    return out


# --- torch.library registrations: shapes for torch.compile, the gradient for autograd ----------

if available():

    @torch.library.register_fake("vlmfast::token_stats_block")
    def _stats_fake(logits, target, teacher_logits, inv_t, kl_mode, ignore_index):
        rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
        return tuple(torch.empty_like(rows) for _ in range(5))

    @torch.library.register_fake("vlmfast::token_stats_new_state")
    def _new_state_fake(rows):
        return torch.empty(rows, STATE_WIDTH, dtype=torch.float64)

    @torch.library.register_fake("vlmfast::token_stats_finish")
    def _finish_fake(state, target, kl_mode, ignore_index):
        rows = state.new_empty(state.shape[0], dtype=torch.float32)
        return tuple(torch.empty_like(rows) for _ in range(5))

    @torch.library.register_fake("vlmfast::token_stats_accumulate_")
    def _accumulate_fake(state, logits, target, teacher_logits, inv_t, kl_mode, ignore_index, col_offset):
        return None

    if hasattr(torch.ops.vlmfast, "mm_wide_"):

        @torch.library.register_fake("vlmfast::mm_wide_")
        def _mm_wide_fake(out, a, b, accumulate):
            return None

    @torch.library.register_fake("vlmfast::token_stats_block_grad")
    def _grad_fake(logits, target, teacher_logits, lse, entropy, kl, lse_t, g_logp, g_entropy, g_kl, g_lse,
                   inv_t, kl_mode, ignore_index, col_offset, grad_logits):
        return None

    def _stats_setup(ctx, inputs, output):
        logits, target, teacher_logits, inv_t, kl_mode, ignore_index = inputs
        lse, _, entropy, kl, lse_t = output
        ctx.save_for_backward(logits, target, teacher_logits, lse, entropy, kl, lse_t)
        ctx.args = (inv_t, kl_mode, ignore_index)

    def _stats_backward(ctx, g_lse, g_logp, g_entropy, g_kl, _g_lse_t):
        """Gradient w.r.t. the student logits only (the teacher is a constant, as in DESIGN §3)."""
        logits, target, teacher_logits, lse, entropy, kl, lse_t = ctx.saved_tensors
        zero = torch.zeros_like(lse)
        gs = [zero if g is None else g.float().contiguous() for g in (g_logp, g_entropy, g_kl, g_lse)]
        dz = torch.empty_like(logits)
        torch.ops.vlmfast.token_stats_block_grad(logits, target, teacher_logits, lse, entropy, kl, lse_t, *gs,
                                                 *ctx.args, 0, dz)
        return dz, None, None, None, None, None

    torch.library.register_autograd("vlmfast::token_stats_block", _stats_backward, setup_context=_stats_setup)
