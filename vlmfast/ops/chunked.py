"""Chunked backend: the logits are computed block by block (h W^T + b, or sliced from given
logits), reduced to the per-token statistics, and dropped. Any device; the CPU path. Peak memory is
O(N·H + V·H) plus a few fp32 blocks of about BLOCK_BYTES (64 MB) each.

Two ways through the blocks, same results:

- native (CPU, when the extension in kernels/cpu/ is built, see native.py): blocks of rows x
  vocabulary columns, [up to 8192 rows, C], so every GEMM is tall (all the rows against a slice of
  W); one C++ pass per block folds it into online per-row sums (forward) or turns it into dz in
  place (backward). `VLMFAST_NATIVE=0` turns it off.
- PyTorch (everywhere else): blocks of whole rows [rows, V] and the epilogue in torch ops (RowsSoftmax,
  rows_stats, rows_grad_): one log_softmax kernel, exp over the logits' buffer, only the gradient terms that are
  given, all in two buffers per head reused from block to block (fresh [rows, V] memory per block cost the CPU its
  page faults: more than the math).

Backward recomputes each block from the saved O(N) statistics and applies, per token,

    dz_j = ( g_logp (onehot_j - p_j)
           - g_H    p_j (log p_j + H)
           + g_KL   p_j (log p_j - log q_j - KL)     (reverse KL)
           + g_KL   (p_j - q_j)                      (forward KL)
           + g_lse  p_j ) / T

then dh = dz W, dW += dz^T h (fp32), db += sum dz.
"""

from __future__ import annotations

import os

import torch

from . import native
from ._inputs import Teacher
from ._matmul import mm_wide, wide_dtype
from .floor import floor_logits_

BLOCK_BYTES = int(os.environ.get("VLMFAST_CHUNK_BYTES", 64 * 2**20))
NATIVE_MIN_COLS = 2048  # the native path's blocks: as many rows as fit with at least this many columns
NATIVE_MAX_COLS = 16384  # columns per 16-bit GEMM call (see LinearHead._block_low_precision)


def column_slices(c0: int, c1: int):
    """(k0, k1) slices of columns [c0, c1), NATIVE_MAX_COLS wide: the 16-bit GEMMs' calls (_block_low_precision)."""
    for k0 in range(c0, c1, NATIVE_MAX_COLS):
        yield k0, min(c1, k0 + NATIVE_MAX_COLS)


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMMs for this 16-bit dtype run on oneDNN's kernels (torch's own check; False when torch
    lacks it)."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def default_chunk_rows(vocab: int) -> int:
    return max(16, BLOCK_BYTES // (4 * vocab))


def reused(store: dict, name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A [rows, cols] view of a buffer kept in `store` from block to block, valid until the next request of `name`:
    a fresh 64 MB tensor per block would cost its page faults every time on a CPU (~15% of the GEMM; the PyTorch
    epilogue's ops took 3-5x their in-cache time on fresh memory). CUDA's caching allocator reuses blocks itself."""
    if torch.device(device).type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buf = store.get(name)
    if buf is None or buf.numel() < rows * cols or buf.dtype != dtype:
        buf = store[name] = torch.empty(rows * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


def native_block_shape(head, n_rows: int) -> tuple[int, int]:
    """(rows, columns) of the native path's blocks: tall for a matmul head (the GEMMs' efficiency
    grows with the rows), whole rows for given logits (no GEMM; the block is a view)."""
    V = head.vocab
    if isinstance(head, LogitsHead):
        return default_chunk_rows(V), V
    rows = max(1, min(n_rows, BLOCK_BYTES // (4 * min(V, NATIVE_MIN_COLS))))
    return rows, max(1, min(V, BLOCK_BYTES // (4 * rows)))


class LinearHead:
    """Logits h W^T + b of a block of rows, computed on demand, with gradient accumulation."""

    def __init__(self, hidden, weight, bias=None, *, need_dh=False, need_dw=False, need_db=False, rows_per_band=None,
                 native_epilogue=True):
        self.hidden, self.bias = hidden, bias
        self.dtype = wide_dtype(weight.dtype)  # fp32 (fp64 for gradcheck)
        # 16-bit CPU inputs stay 16-bit: the native path's GEMMs take them as they are with an fp32
        # result (native.mm_wide_); without it, torch's 16-bit GEMMs round the logits to the dtype, as naive's
        # are (torch_keeps_16bit). Otherwise, on the CPU, one fp32 copy of W serves every block; on CUDA 16-bit
        # stays on tensor cores with fp32 output.
        # native_epilogue=False (native_beside a teacher it cannot take): the PyTorch epilogue will run
        self.low_precision = native_epilogue and self.keeps_16bit(hidden, weight)
        self.torch_16bit = not self.low_precision and self.torch_keeps_16bit(hidden, weight)
        if self.low_precision or self.torch_16bit:
            self.hidden = hidden.contiguous()  # the GEMMs' row-major operand
        self.weight = weight if weight.is_cuda or self.low_precision or self.torch_16bit else weight.to(self.dtype)
        self.vocab, self.device = weight.shape[0], weight.device
        self.need_dh, self.need_dw, self.need_db = need_dh, need_dw, need_db
        self.dh = torch.empty_like(self.hidden) if need_dh else None
        self.dw = self.dz16_rows = None
        if need_dw:
            N, H = self.hidden.shape
            rows = rows_per_band or (native_block_shape(self, N)[0] if self.low_precision
                                     else default_chunk_rows(self.vocab))
            # 16-bit: the native GEMMs with one band of rows (the native path's tall blocks, or rows_per_band) finish
            # each dW block at once and round it straight into a dW of W's dtype; with several bands every row's
            # 16-bit dz is kept while it costs no more than an fp32 [V, H] accumulator (2NV <= 4VH bytes), and dW
            # is one GEMM over all rows in finish_grads, rounded once as naive's; beyond that, the fp32 accumulator
            direct = self.low_precision and rows >= N
            keep_dz = (self.low_precision or self.torch_16bit) and not direct and 2 * N <= 4 * H
            if keep_dz:
                self.dz16_rows = torch.zeros(N, self.vocab, dtype=weight.dtype)
            self.dw = torch.zeros(weight.shape, dtype=weight.dtype if direct or keep_dz else self.dtype,
                                  device=weight.device)
        self.db = torch.zeros(self.vocab, dtype=self.dtype, device=weight.device) if need_db else None
        self.dh32 = None
        self.scratch = {}  # buffers reused from block to block (reused): the native path's and the PyTorch epilogue's

    @staticmethod
    def keeps_16bit(hidden, weight) -> bool:
        """Whether 16-bit CPU inputs stay 16-bit (the native GEMM takes them), rather than W copied to fp32."""
        return not weight.is_cuda and hidden.dtype == weight.dtype and native.wide_gemm(weight.dtype)

    @staticmethod
    def torch_keeps_16bit(hidden, weight) -> bool:
        """Whether 16-bit CPU inputs on the PyTorch epilogue (the native kernels off or not built) run torch's
        16-bit GEMMs (16-bit results, products summed in fp32: the logits rounded to the dtype once, as naive's
        materialised ones are) rather than W copied to fp32: where oneDNN has kernels for the dtype (AVX-512 for
        bf16, AVX512-FP16/AMX for fp16; bf16 at 4.5x fp32's speed on a Zen 5). Elsewhere (AVX2) torch's 16-bit
        GEMMs run 3x (forward) to 100x (backward) slower than fp32 (docs/platform.md). The head's gradients then
        come whole rows at a time (accumulate)."""
        return (not weight.is_cuda and hidden.dtype == weight.dtype and not native.enabled()
                and weight.dtype in (torch.bfloat16, torch.float16) and onednn_supports(weight.dtype))

    def logits(self, r0: int, r1: int) -> torch.Tensor:
        z = mm_wide(self.hidden[r0:r1], self.weight.T)
        return z if self.bias is None else z.add_(self.bias.to(z.dtype))

    # -- the native path: blocks of rows x columns (CPU, fp32 math) ------------------------------

    def _scratch(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        return reused(self.scratch, name, rows, cols, dtype, self.device)

    def rows_logits(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1)'s fp32 logits over the whole vocabulary, for the PyTorch epilogue to overwrite: on the CPU
        block()'s reused buffer (valid until the next call), on CUDA a fresh tensor."""
        return self.block(r0, r1, 0, self.vocab) if self.device.type == "cpu" else self.logits(r0, r1)

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """The fp32 block h[r0:r1] W[c0:c1]^T + b[c0:c1] (the bias rides in the GEMM), written into
        one buffer reused from block to block: valid until the next call."""
        out = self._scratch("logits", r1 - r0, c1 - c0, self.dtype)
        if self.low_precision:
            return self._block_low_precision(r0, r1, c0, c1, out)
        if self.torch_16bit:  # rounded to the dtype by the GEMM, widened into the fp32 buffer (the bias added in fp32)
            z16 = self._scratch("rows16", r1 - r0, c1 - c0, self.weight.dtype)  # free until dz (accumulate)
            out.copy_(torch.mm(self.hidden[r0:r1], self.weight[c0:c1].T, out=z16))
            return out if self.bias is None else out.add_(self.bias[c0:c1])
        h = self.hidden[r0:r1].to(self.dtype)
        w = self.weight[c0:c1]
        if self.bias is None:
            return torch.mm(h, w.T, out=out)
        return torch.addmm(self.bias[c0:c1].to(self.dtype), h, w.T, out=out)

    def _block_low_precision(self, r0, r1, c0, c1, out):
        """h W^T in fp32 from 16-bit h and W, W's block read in place as a transposed view (the GEMM packs
        either layout): no conversion, no copy. A whole-vocabulary block (one_pass.py's bands) goes in slices of
        NATIVE_MAX_COLS columns: brgemm's path (CPUs without AVX512-BF16) copies a transposed operand row-major
        and widens its operands to fp32, so a call over all of W would hold another [V, H] in fp32 at the peak
        (+890 MB at N=512 on the full Qwen vocabulary)."""
        for k0, k1 in column_slices(c0, c1):
            native.mm_wide_(out[:, k0 - c0:k1 - c0], self.hidden[r0:r1], self.weight[k0:k1].T, accumulate=False)
        return out if self.bias is None else out.add_(self.bias[c0:c1])

    def grad_block(self, r0: int, r1: int, c0: int, c1: int, z: torch.Tensor) -> torch.Tensor:
        return z  # dz goes over the fresh logits block

    def accumulate_block(self, r0: int, r1: int, c0: int, c1: int, dz: torch.Tensor) -> None:
        if self.low_precision:  # in slices of columns, as _block_low_precision: brgemm's copies stay a slice's
            for k0, k1 in column_slices(c0, c1):
                self._accumulate_low_precision(r0, r1, k0, k1, dz[:, k0 - c0:k1 - c0])
            return None
        if self.need_dh:  # summed over column blocks in fp32, cast once in finish_grads
            if self.dh32 is None:
                self.dh32 = torch.zeros(self.hidden.shape, dtype=self.dtype)
            self.dh32[r0:r1].addmm_(dz, self.weight[c0:c1])
        if self.need_dw:
            self.dw[c0:c1].addmm_(dz.T, self.hidden[r0:r1].to(self.dtype))
        if self.need_db:
            self.db[c0:c1] += dz.sum(0)

    def _accumulate_low_precision(self, r0, r1, c0, c1, dz):
        """dh += dz W and dW += dz^T h with dz rounded once to the inputs' dtype (as autograd's 16-bit dlogits
        are), products summed in fp32; dz^T is a view. Kept dz rows (dz16_rows): dW in finish_grads."""
        if self.dz16_rows is not None:
            dz16 = self.dz16_rows[r0:r1, c0:c1].copy_(dz)
        else:
            dz16 = self._scratch("dz16", r1 - r0, c1 - c0, self.weight.dtype).copy_(dz)
        if self.need_dh:
            if self.dh32 is None:
                self.dh32 = torch.zeros(self.hidden.shape, dtype=self.dtype)
            native.mm_wide_(self.dh32[r0:r1], dz16, self.weight[c0:c1], accumulate=True)
        if self.need_dw and self.dz16_rows is None:
            if self.dw.dtype == self.dtype:  # several bands of rows: summed in fp32
                native.mm_wide_(self.dw[c0:c1], dz16.T, self.hidden[r0:r1], accumulate=True)
            else:
                self._dw_block_native(c0, c1, dz16, self.hidden[r0:r1])
        if self.need_db:
            self.db[c0:c1] += dz.sum(0)

    def _dw_block_native(self, c0, c1, dz16, h):
        """dW[c0:c1] = dz16^T h whole (every row), in fp32 and rounded once into W's dtype."""
        dw = self._scratch("dw", c1 - c0, self.hidden.shape[1], self.dtype)
        self.dw[c0:c1].copy_(native.mm_wide_(dw, dz16.T, h, accumulate=False))

    def _accumulate_torch_16bit(self, r0, r1, dz):
        """dh = dz W of whole rows by torch's 16-bit GEMMs, dz rounded once to the inputs' dtype (as autograd's 16-bit
        dlogits are) and the product rounded once into dh, as naive's. dW: dz kept for finish_grads' one GEMM, or
        (more rows than 2H) each band's product rounded to 16 bits and summed in fp32, in slices of NATIVE_MAX_COLS
        columns (the partial's buffer stays a slice's)."""
        H, dt = self.hidden.shape[1], self.weight.dtype
        if self.dz16_rows is not None:
            dz16 = self.dz16_rows[r0:r1].copy_(dz)
        else:
            dz16 = self._scratch("rows16", r1 - r0, self.vocab, dt).copy_(dz)
        if self.need_dh:
            torch.mm(dz16, self.weight, out=self.dh[r0:r1])
        if self.need_dw and self.dz16_rows is None:
            for k0, k1 in column_slices(0, self.vocab):
                part = self._scratch("dw16", k1 - k0, H, dt)
                self.dw[k0:k1] += torch.mm(dz16[:, k0:k1].T, self.hidden[r0:r1], out=part)
        if self.need_db:
            self.db += dz.sum(0)

    def finish_grads(self) -> None:
        if self.dz16_rows is not None:  # every row's dz in: dW = dz^T h
            if self.low_precision:  # in slices of columns, as _block_low_precision
                for k0, k1 in column_slices(0, self.vocab):
                    self._dw_block_native(k0, k1, self.dz16_rows[:, k0:k1], self.hidden)
            else:
                torch.mm(self.dz16_rows.T, self.hidden, out=self.dw)
            self.dz16_rows = None
        if self.dh32 is not None:
            self.dh.copy_(self.dh32)
            self.dh32 = None

    def accumulate(self, r0: int, r1: int, dz: torch.Tensor) -> None:
        if self.torch_16bit:
            return self._accumulate_torch_16bit(r0, r1, dz)
        h = self.hidden[r0:r1]
        if self.need_dh:
            dz_op = dz if not self.weight.is_cuda else dz.to(self.weight.dtype)
            self.dh[r0:r1] = mm_wide(dz_op, self.weight).to(self.dh.dtype)
        if self.need_dw:
            if h.is_cuda:
                self.dw += mm_wide(dz.to(h.dtype).T, h)
            else:  # in place: no [V, H] temporary per block
                self.dw.addmm_(dz.T, h.to(self.dw.dtype))
        if self.need_db:
            self.db += dz.sum(0)


class LogitsHead:
    """Rows of logits given directly; the gradient w.r.t. them is dz itself. `rows`: row r of this head is row
    rows[r] of `logits` (token_loss's counted rows, gathered a band at a time: no compacted copy of [n, V])."""

    def __init__(self, logits, *, need_grad=False, rows=None):
        self.x, self.rows = logits, rows
        self.dtype = wide_dtype(logits.dtype)
        self.vocab, self.device = logits.shape[-1], logits.device
        self.dx = torch.empty_like(logits) if need_grad else None
        self.scratch = {}

    def _x(self, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> torch.Tensor:
        """Rows [r0, r1), columns [c0, c1): a view, or those columns of the rows gathered into a reused buffer of the
        logits' dtype (valid until the next call)."""
        x = self.x[:, c0:c1]
        if self.rows is None:
            return x[r0:r1]
        gathered = reused(self.scratch, "gathered", r1 - r0, x.shape[1], self.x.dtype, self.device)
        return torch.index_select(x, 0, self.rows[r0:r1], out=gathered)

    def rows_logits(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) widened into a reused buffer (LinearHead.rows_logits): the epilogue overwrites it."""
        return reused(self.scratch, "logits", r1 - r0, self.vocab, self.dtype, self.device).copy_(self._x(r0, r1))

    def accumulate(self, r0: int, r1: int, dz: torch.Tensor) -> None:
        if self.dx is not None:
            self.dx[r0:r1] = dz.to(self.dx.dtype)

    # -- the native path reads the logits as they are and writes dz straight into the gradient --

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        return self._x(r0, r1, c0, c1)

    def grad_block(self, r0: int, r1: int, c0: int, c1: int, z: torch.Tensor) -> torch.Tensor:
        return self.dx[r0:r1, c0:c1]

    def accumulate_block(self, r0: int, r1: int, c0: int, c1: int, dz: torch.Tensor) -> None:
        pass

    def finish_grads(self) -> None:
        pass


def teacher_head(teacher: Teacher | None, rows=None):
    if teacher is None:
        return None
    if teacher.logits is not None:
        return LogitsHead(teacher.logits, rows=rows)
    return LinearHead(teacher.hidden, teacher.weight, teacher.bias)


def _native_head_ok(head) -> bool:
    """The native path takes fp32/bf16/fp16 CPU logits (fp64, for gradcheck, stays in PyTorch)."""
    if isinstance(head, LogitsHead):
        return native.usable(head.x)
    return head.dtype == torch.float32 and not head.weight.is_cuda


def native_beside(teacher) -> bool:
    """Whether the native path can run beside this teacher head (None: no teacher): fp64 or column-strided teacher
    logits send the whole call to the PyTorch epilogue, so the student's head must not be built for the native one."""
    return teacher is None or _native_head_ok(teacher)


def _native_ok(student, teacher) -> bool:
    return native.enabled() and _native_head_ok(student) and native_beside(teacher)


def _blocks(n_rows: int, vocab: int, shape):
    rows, cols = shape
    for r0 in range(0, n_rows, rows):
        for c0 in range(0, vocab, cols):
            yield r0, min(n_rows, r0 + rows), c0, min(vocab, c0 + cols)


def _forward_native(student, target, *, inv_t, teacher, kl, ignore_index) -> dict:
    N, V = target.numel(), student.vocab
    names = ["lse", "logp", "entropy"] + (["kl", "lse_t"] if teacher is not None else [])
    out = {k: torch.zeros(N) for k in names}
    acc = None
    for r0, r1, c0, c1 in _blocks(N, V, native_block_shape(student, N)):
        if c0 == 0:  # a new band of rows: fresh online sums
            acc = native.OnlineStats(target[r0:r1], inv_t=inv_t, kl=kl, teacher=teacher is not None,
                                     ignore_index=ignore_index)
        zt = teacher.block(r0, r1, c0, c1) if teacher is not None else None
        acc.add(student.block(r0, r1, c0, c1), zt, c0)
        if c1 == V:
            for k, v in acc.result().items():
                out[k][r0:r1] = v
    return out


def _backward_native(student, target, stats, g, *, inv_t, teacher, kl, ignore_index):
    N, V = target.numel(), student.vocab
    for r0, r1, c0, c1 in _blocks(N, V, native_block_shape(student, N)):
        z = student.block(r0, r1, c0, c1)
        zt = teacher.block(r0, r1, c0, c1) if teacher is not None else None
        dz = student.grad_block(r0, r1, c0, c1, z)
        native.block_grad_(z, target[r0:r1], zt, {k: v[r0:r1] for k, v in stats.items()},
                           {k: v[r0:r1] for k, v in g.items() if v is not None}, dz, inv_t=inv_t, kl=kl,
                           ignore_index=ignore_index, col_offset=c0)
        student.accumulate_block(r0, r1, c0, c1, dz)
    student.finish_grads()


ROW_DOT_COLS = 8192  # columns per slice of _row_dot's product: its temporary stays [R, 8192]


def _row_dot(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j a_ij b_ij per row (Σ_j a_ij (b_ij - c_ij) with c), the product in slices of ROW_DOT_COLS columns: no
    [R, V] temporary. torch's sum, not a batched dot product: bmm sums sequentially (entropy off by 1.6e-3 at
    V = 151936 in fp32, against 8e-7 here)."""
    out = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    for c0 in range(0, a.shape[1], ROW_DOT_COLS):
        cols = slice(c0, c0 + ROW_DOT_COLS)
        prod = b[:, cols] * a[:, cols] if c is None else torch.sub(b[:, cols], c[:, cols]).mul_(a[:, cols])
        out += prod.sum(-1)
    return out


class RowsSoftmax:
    """The PyTorch epilogue's softmax of rows [r0, r1) of a head at temperature T: lse [R], log p [R, V] and (with
    need_p) p [R, V] over the logits' buffer, in the head's reused buffers (valid until the head's next rows): a few
    passes over [R, V] and no fresh [R, V] memory, whose page faults cost the CPU more than the math."""

    @torch.no_grad()  # out= takes no autograd inputs (a caller's own leaves, as in the property tests)
    def __init__(self, head, r0: int, r1: int, inv_t: float, *, need_p: bool = True):
        z = head.rows_logits(r0, r1)
        if inv_t != 1.0:
            z.mul_(inv_t)
        floor_logits_(z)  # masked (-inf) columns add nothing, and no 0 x -inf
        logp = reused(head.scratch, "logp", z.shape[0], head.vocab, head.dtype, head.device)
        self.logp = torch.log_softmax(z, -1, out=logp)  # one ATen kernel: max, Σ exp, write
        # lse from the max column, where log_softmax wrote -log Σ exp(z - max): as exact as logsumexp, one read
        zmax, top = z.max(-1, keepdim=True)
        self.lse = (zmax - self.logp.gather(1, top))[:, 0]
        self.p = torch.exp(self.logp, out=z) if need_p else None
        self.free = None if need_p else z  # the logits' buffer, for the caller's temporaries


def rows_softmax(student, teacher, r0, r1, *, inv_t, kl):
    """What the statistics and rows_grad_ need of rows [r0, r1): (the student's RowsSoftmax, the teacher's or None,
    log p - log q [R, V] for the reverse KL (over the teacher's logits) or None); the teacher's p for the forward KL."""
    s = RowsSoftmax(student, r0, r1, inv_t)
    if teacher is None:
        return s, None, None
    t = RowsSoftmax(teacher, r0, r1, inv_t, need_p=kl == "forward")
    return s, t, torch.sub(s.logp, t.logp, out=t.free) if kl == "reverse" else None


def rows_stats(student, teacher, r0, r1, safe_target, *, inv_t, kl):
    """The PyTorch epilogue's statistics of rows [r0, r1) from their whole-vocabulary logits: ({lse, logp,
    entropy (+ kl, lse_t)}, rows_softmax's state for rows_grad_)."""
    rows = s, t, diff = rows_softmax(student, teacher, r0, r1, inv_t=inv_t, kl=kl)
    out = {"lse": s.lse, "logp": s.logp.gather(1, safe_target[:, None])[:, 0], "entropy": -_row_dot(s.p, s.logp)}
    if t is not None:
        out["lse_t"] = t.lse
        # reverse: Σ p (log p - log q); forward: Σ q (log q - log p)
        out["kl"] = _row_dot(s.p, diff) if kl == "reverse" else _row_dot(t.p, t.logp, s.logp)
    return out, rows


def rows_grad_(rows, safe_target, stats: dict, g: dict, *, inv_t, kl):
    """dz [R, V] of rows_softmax's `rows` (written over p; log p and the KL difference overwritten) for per-row
    upstream gradients g ("logp", "entropy", "kl", "lse"; missing or None: zero) and their statistics. The module
    docstring's formula, as p_j times a per-row constant plus only the per-column terms whose gradient is given."""
    s, t, diff = rows

    def row(name):  # [R, 1], with 1/T folded in
        v = g.get(name)
        return None if v is None else (v * inv_t)[:, None]

    g_logp, g_ent, g_lse = row("logp"), row("entropy"), row("lse")
    g_kl = row("kl") if t is not None else None
    a = torch.zeros_like(s.lse)[:, None]  # the per-row part of p_j's coefficient
    if g_lse is not None:
        a = a + g_lse
    if g_logp is not None:
        a = a - g_logp
    if g_ent is not None:
        a = a - g_ent * stats["entropy"][:, None]
    if g_kl is not None:
        a = a + g_kl if kl == "forward" else a - g_kl * stats["kl"][:, None]
    c = s.logp.mul_(-g_ent) if g_ent is not None else None  # -g_H log p_j
    if g_kl is not None and kl == "reverse":  # + g_KL (log p_j - log q_j)
        c = diff.mul_(g_kl) if c is None else c.addcmul_(diff, g_kl)
    dz = s.p.mul_(a) if c is None else s.p.mul_(c.add_(a))
    if g_kl is not None and kl == "forward":
        dz.addcmul_(t.p, -g_kl)
    if g_logp is not None:  # the onehot term added after the p-terms: no cancellation as p_y -> 1
        dz.scatter_add_(1, safe_target[:, None], g_logp)
    return dz


def forward(student, target, *, temperature, teacher=None, kl=None, ignore_index=-100, chunk_rows=None):
    """Per-token fp32 statistics: dict with lse, logp, entropy (+ kl, lse_t with a teacher)."""
    if _native_ok(student, teacher):
        out = _forward_native(student, target, inv_t=1.0 / temperature, teacher=teacher, kl=kl,
                              ignore_index=ignore_index)
        return finish(out)
    N = target.numel()
    dev = target.device
    chunk_rows = chunk_rows or default_chunk_rows(student.vocab)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    names = ["lse", "logp", "entropy"] + (["kl", "lse_t"] if teacher is not None else [])
    out = {k: torch.zeros(N, dtype=student.dtype, device=dev) for k in names}
    inv_t = 1.0 / temperature
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        stats, _ = rows_stats(student, teacher, r0, r1, safe[r0:r1], inv_t=inv_t, kl=kl)
        for k, v in stats.items():
            out[k][r0:r1] = v
    for k, v in out.items():
        out[k] = torch.where(valid, v, torch.zeros_like(v))
    return finish(out)


def finish(out: dict) -> dict:
    """Clamp round-off so the invariants hold exactly: logp <= 0, entropy >= 0, KL >= 0."""
    out["logp"] = out["logp"].clamp_(max=0.0)
    out["entropy"] = out["entropy"].clamp_(min=0.0)
    if "kl" in out:
        out["kl"] = out["kl"].clamp_(min=0.0)
    return out


def backward(student, target, stats, grads, *, temperature, teacher=None, kl=None, ignore_index=-100,
             chunk_rows=None):
    """Accumulate into `student` the gradient of sum(g_o * o) over outputs o, for per-token g_o.

    `grads` maps "logp", "entropy", "kl", "lse" to [N] fp32 upstream gradients or None.
    """
    N = target.numel()
    chunk_rows = chunk_rows or default_chunk_rows(student.vocab)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    zero = torch.zeros(N, dtype=student.dtype, device=target.device)
    g = {k: None if grads.get(k) is None else torch.where(valid, grads[k].to(zero.dtype), zero)
         for k in ("logp", "entropy", "kl", "lse")}
    use_kl = teacher is not None and grads.get("kl") is not None
    inv_t = 1.0 / temperature
    if _native_ok(student, teacher):
        _backward_native(student, target, stats, g, inv_t=inv_t, teacher=teacher if use_kl else None,
                         kl=kl if use_kl else None, ignore_index=ignore_index)
        return student
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        rows = rows_softmax(student, teacher if use_kl else None, r0, r1, inv_t=inv_t, kl=kl)
        dz = rows_grad_(rows, safe[r0:r1], {k: v[r0:r1] for k, v in stats.items()},
                        {k: v[r0:r1] for k, v in g.items() if v is not None}, inv_t=inv_t, kl=kl)
        student.accumulate(r0, r1, dz)
    student.finish_grads()
    return student

