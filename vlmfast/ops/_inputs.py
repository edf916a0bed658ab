"""Input checks for the fused ops: every bad input fails here, with a message naming the problem,
before any compute starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OUTPUT_NAMES = ("logp", "entropy", "kl", "lse")
KL_MODES = (None, "reverse", "forward")
BACKENDS = ("auto", "triton", "chunked", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Teacher:
    """The teacher of a KL term: its last hidden states and head (fused: its logits are never stored),
    or its logits. It receives no gradient."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @classmethod
    def coerce(cls, teacher) -> Teacher | None:
        if teacher is None or isinstance(teacher, Teacher):
            return teacher
        if isinstance(teacher, torch.Tensor):
            return cls(logits=teacher)
        if isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
            return cls(*teacher)
        raise TypeError(
            "teacher must be a Teacher, a logits tensor [N, V], or a tuple (hidden, weight[, bias]); "
            f"got {type(teacher).__name__}"
        )


@dataclass
class Checked:
    """Flattened, validated inputs of one token_stats call."""

    hidden: torch.Tensor  # [N, H] (or logits [N, V] for the from-logits op)
    weight: torch.Tensor | None  # [V, H]
    bias: torch.Tensor | None  # [V]
    target: torch.Tensor  # [N] int64
    teacher: Teacher | None  # flattened to [N, ...]
    kl: str | None
    temperature: float
    vocab: int
    batch_shape: tuple  # target's shape: outputs are reshaped to it
    segment: torch.Tensor | None  # [N] int64 sequence index of each token, for per-sequence sums
    num_segments: int


def _check_float(name: str, t, *, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")


# elements per slice of the finite check: its temporaries (a bool mask; on the CPU |t| too) stay ~16-64 MB where
# the whole-tensor check held one of the input's size (a 7B head's W: 545M elements; teacher logits [N, V]: more)
FINITE_CHECK_ELEMS = 1 << 24


def _check_finite(name: str, t: torch.Tensor, *, masked_ok: bool = False) -> None:
    """NaN/inf check in slices along dim 0, one host sync at the end. Logits (`masked_ok`) may hold -inf: a masked
    column (ops/floor.py); NaN and +inf are refused there too."""
    t = t.reshape(1) if t.dim() == 0 else t
    row = t[0].numel() if t.shape[0] else 1  # elements per index of dim 0
    step = max(1, FINITE_CHECK_ELEMS // max(1, row))
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for r0 in range(0, t.shape[0], step):
        part = t[r0:r0 + step]
        ok &= (torch.isfinite(part) | torch.isneginf(part)).all() if masked_ok else torch.isfinite(part).all()
    if not bool(ok):
        raise ValueError(f"{name} contains NaN or {'+inf' if masked_ok else 'inf'}")


def check_common(
    target, *, temperature, kl, outputs, ignore_index, vocab: int, device, check_values: bool
) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be an integer tensor (token ids), got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but hidden is on {device}")
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    unknown = [o for o in outputs if o not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; choose from {OUTPUT_NAMES}")
    if "kl" in outputs and kl is None:
        raise ValueError("output 'kl' requested but kl=None: pass kl='reverse' or kl='forward' with a teacher")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < vocab:
        raise ValueError(
            f"ignore_index={ignore_index} is a real token id (vocabulary size {vocab}); use a negative value"
        )
    if check_values and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(
                f"target contains id {first} outside [0, {vocab}) that is not ignore_index={ignore_index}"
            )


def check_token_stats(
    hidden, weight, target, *, bias, temperature, teacher, kl, outputs, ignore_index,
    per_sequence, cu_seqlens, check_values,
) -> Checked:
    _check_float("hidden", hidden, dims=(2, 3))
    _check_float("weight", weight, dims=(2,))
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_float("bias", bias, dims=(1,))
        if bias.shape[0] != V:
            raise ValueError(f"bias has {bias.shape[0]} entries but the vocabulary has {V}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    check_common(
        target, temperature=temperature, kl=kl, outputs=outputs, ignore_index=ignore_index,
        vocab=V, device=hidden.device, check_values=check_values,
    )
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if check_values:
        _check_finite("hidden", hidden)
    teacher = _check_teacher(Teacher.coerce(teacher), kl, target.shape, V, hidden.device, check_values,
                             student_dtype=hidden.dtype)
    segment, num_segments = _segments(per_sequence, cu_seqlens, target)
    return Checked(
        hidden=hidden.reshape(-1, H),
        weight=weight,
        bias=bias,
        target=target.reshape(-1).long(),
        teacher=teacher,
        kl=kl,
        temperature=float(temperature),
        vocab=V,
        batch_shape=tuple(target.shape),
        segment=segment,
        num_segments=num_segments,
    )


def check_from_logits(
    logits, target, *, temperature, teacher, kl, outputs, ignore_index, per_sequence, cu_seqlens,
    check_values,
) -> Checked:
    _check_float("logits", logits, dims=(2, 3))
    V = logits.shape[-1]
    check_common(
        target, temperature=temperature, kl=kl, outputs=outputs, ignore_index=ignore_index,
        vocab=V, device=logits.device, check_values=check_values,
    )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits' leading shape {tuple(logits.shape[:-1])}"
        )
    if check_values:
        _check_finite("logits", logits, masked_ok=True)
    teacher = _check_teacher(Teacher.coerce(teacher), kl, target.shape, V, logits.device, check_values)
    if teacher is not None and teacher.logits is None:
        raise ValueError("token_stats_from_logits takes the teacher as logits [..., V]")
    segment, num_segments = _segments(per_sequence, cu_seqlens, target)
    return Checked(
        hidden=logits.reshape(-1, V), weight=None, bias=None, target=target.reshape(-1).long(),
        teacher=teacher, kl=kl, temperature=float(temperature), vocab=V,
        batch_shape=tuple(target.shape), segment=segment, num_segments=num_segments,
    )


def _check_teacher(teacher: Teacher | None, kl, lead_shape, V, device, check_values,
                   student_dtype=None) -> Teacher | None:
    if teacher is None:
        if kl is not None:
            raise ValueError(f"kl={kl!r} needs a teacher (hidden + weight, or logits)")
        return None
    if kl is None:
        raise ValueError("a teacher was given but kl=None: pass kl='reverse' or kl='forward'")
    lead_shape = tuple(lead_shape)
    if teacher.logits is not None:
        if teacher.hidden is not None or teacher.weight is not None:
            raise ValueError("give the teacher as logits OR as hidden + weight, not both")
        _check_float("teacher logits", teacher.logits, dims=(2, 3))
        if tuple(teacher.logits.shape) != lead_shape + (V,):
            raise ValueError(
                f"teacher logits shape {tuple(teacher.logits.shape)} must be {lead_shape + (V,)} "
                "(same tokens and vocabulary as the student)"
            )
        if teacher.logits.device != device:
            raise ValueError(f"teacher logits are on {teacher.logits.device} but the student is on {device}")
        if check_values:
            _check_finite("teacher logits", teacher.logits, masked_ok=True)
        return Teacher(logits=teacher.logits.reshape(-1, V).detach())
    if teacher.hidden is None or teacher.weight is None:
        raise ValueError("the teacher needs both hidden and weight (or logits)")
    _check_float("teacher hidden", teacher.hidden, dims=(2, 3))
    _check_float("teacher weight", teacher.weight, dims=(2,))
    Vt, Ht = teacher.weight.shape
    if Vt != V:
        raise ValueError(f"vocabulary mismatch: student has {V} tokens, teacher weight has {Vt}")
    if tuple(teacher.hidden.shape) != lead_shape + (Ht,):
        raise ValueError(
            f"teacher hidden shape {tuple(teacher.hidden.shape)} must be {lead_shape + (Ht,)} "
            f"(the student's tokens, the teacher weight's hidden size {Ht})"
        )
    if teacher.hidden.dtype != teacher.weight.dtype:
        raise TypeError(f"teacher hidden {teacher.hidden.dtype} and weight {teacher.weight.dtype} differ")
    if student_dtype is not None and teacher.hidden.dtype != student_dtype:
        # one GEMM precision for both heads: an fp32 teacher beside a 16-bit student would run in TF32
        raise TypeError(f"teacher dtype {teacher.hidden.dtype} differs from the student's {student_dtype}: "
                        f"cast the teacher's hidden and weight to {student_dtype} (or the student to the "
                        "teacher's); the fused op computes both heads' logits in one precision")
    parts = (("teacher hidden", teacher.hidden), ("teacher weight", teacher.weight), ("teacher bias", teacher.bias))
    for name, t in parts:
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the student is on {device}")
    if teacher.bias is not None and tuple(teacher.bias.shape) != (V,):
        raise ValueError(f"teacher bias shape {tuple(teacher.bias.shape)} must be ({V},)")
    if check_values:
        _check_finite("teacher hidden", teacher.hidden)
    return Teacher(
        hidden=teacher.hidden.reshape(-1, Ht).detach(),
        weight=teacher.weight.detach(),
        bias=None if teacher.bias is None else teacher.bias.detach(),
    )


def _segments(per_sequence: bool, cu_seqlens, target: torch.Tensor):
    """Sequence index of every token: rows of a [B, T] target, or packed sequences from cu_seqlens."""
    if cu_seqlens is not None:
        if target.dim() != 1:
            raise ValueError(f"cu_seqlens needs a flat [N] target, got shape {tuple(target.shape)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise TypeError("cu_seqlens must be a 1-D integer tensor [num_seqs + 1]")
        cu = cu_seqlens.to(device=target.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != target.numel() or bool((lengths < 0).any()):
            raise ValueError(
                f"cu_seqlens must start at 0, never decrease and end at the token count {target.numel()}; "
                f"got {cu_seqlens.tolist()}"
            )
        S = lengths.numel()
        return torch.repeat_interleave(torch.arange(S, device=target.device), lengths), S
    if per_sequence:
        if target.dim() != 2:
            raise ValueError(
                f"per_sequence=True needs [B, T] inputs (or cu_seqlens); got target shape {tuple(target.shape)}"
            )
        B, T = target.shape
        return torch.arange(B, device=target.device).repeat_interleave(T), B
    return None, 0
