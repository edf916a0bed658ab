"""What every loss shares: the masked means, hyperparameter checks and the nn.Module wrapper.

Convention for every loss: `labels[b, t]` is the token that `hidden[b, t]` predicts (already
shifted), `ignore_index` (-100) on prompt and padding tokens. Losses never see full logits: they
take the policy's last hidden states and lm_head weight and call `vlmfast.token_stats`.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn


def response_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return labels != ignore_index


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean of x over mask; 0 (not NaN) when the mask is empty.

    With `num_items_in_batch` (the token count of the whole batch this call holds a part of, HF's name):
    sum over mask / num_items_in_batch, so the parts of one batch (ranks, accumulation steps) add up to
    its exact token mean instead of a mean of per-part means.
    """
    return (x * mask.to(x.dtype)).sum() / token_count(mask, num_items_in_batch)


def token_count(mask: torch.Tensor, num_items_in_batch=None):
    """What a token mean over mask divides by: the mask's count (at least 1), or num_items_in_batch."""
    return mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch


def check_num_items(num_items_in_batch) -> None:
    """None, or a positive count (int, float or a one-element tensor, kept on its device: no host sync)."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a single count, got shape {tuple(num_items_in_batch.shape)}")
        return
    n = num_items_in_batch
    if isinstance(n, bool) or not (isinstance(n, (int, float)) and math.isfinite(n) and n > 0):
        raise ValueError(f"num_items_in_batch must be a count > 0 (tokens of the whole batch), got {n!r}")


def per_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: mean over each row's masked tokens; 0 for an empty row."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_shape(name: str, t, shape: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} ({what})")


def check_batch_time(hidden: torch.Tensor, labels: torch.Tensor, name: str = "hidden") -> tuple[int, int]:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{name} must be [B, T, H] last hidden states, got {shape}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels for {name} must be [B, T] = {tuple(hidden.shape[:2])}, got {got}")
    return hidden.shape[0], hidden.shape[1]


def accepts_packed(*per_token: str):
    """Let a loss also take packed rows, as flash-attention's varlen layout and TRL's padding-free batches hold
    them: hidden [N, H], labels [N] and the per-token tensors named here [N] (a teacher's hidden states too),
    sequences back to back at offsets `cu_seqlens` [B + 1]. They are laid out as [B, T, ...] (labels padded with
    ignore_index, the rest with 0) before the loss, so per-sequence sums and means see the sequences; the
    gradient flows back to the packed rows. Without cu_seqlens the loss is called as it is."""
    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, cu_seqlens=None, **kwargs):
            if cu_seqlens is None:
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            hidden, labels = a["hidden"], a["labels"]
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
                got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
                raise ValueError(f"with cu_seqlens, hidden must be packed rows [N, H], got {got}")
            n = hidden.shape[0]
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,):
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"with cu_seqlens, labels must be [N] = ({n},), got {got}")
            index = packed_index(cu_seqlens, n, hidden.device)
            a["hidden"] = _pad_rows(hidden, index, 0)
            a["labels"] = _pad_rows(labels, index, a["ignore_index"])
            for name in per_token:
                v = a.get(name)
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                    a[name] = _pad_rows(v, index, 0)
                elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor) and v[0].shape[0] == n:
                    a[name] = (_pad_rows(v[0], index, 0), *v[1:])  # a teacher: (hidden [N, Ht], weight)
            return fn(*bound.args, **bound.kwargs)

        return wrapper

    return decorate


def packed_index(cu_seqlens, n: int, device) -> torch.Tensor:
    """[B, T] row of each packed position (-1 past a sequence's end) from offsets cu_seqlens [B + 1]."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor of B + 1 sequence offsets [0, ..., N]")
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != n or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to N = {n} (the packed rows), got {cu_seqlens.tolist()}")
    t = torch.arange(int(lengths.max()), device=device)
    return torch.where(t[None, :] < lengths[:, None], cu[:-1, None] + t[None, :], torch.full((), -1, device=device))


def _pad_rows(x: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    out = x[index.clamp(min=0)]
    keep = (index >= 0).reshape(*index.shape, *([1] * (x.dim() - 1)))
    return torch.where(keep, out, torch.full((), fill, dtype=x.dtype, device=x.device))


def detached(**values) -> dict:
    """Metrics: detached scalar tensors (no host sync on the training path)."""
    return {k: (v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))) for k, v in values.items()}


class LossModule(nn.Module):
    """nn.Module face of a loss function: hyperparameters in __init__, tensors in forward.

    Subclasses set `fn` (the loss function) and `check` (its hyperparameter validator), so a bad or
    unknown hyperparameter fails at construction, not at the first step.
    """

    fn = None
    check = None

    def __init__(self, **hparams):
        super().__init__()
        fn = type(self).fn
        params = inspect.signature(fn).parameters
        unknown = [k for k in hparams if k not in params or params[k].kind != inspect.Parameter.KEYWORD_ONLY]
        if unknown:
            known = [k for k, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
            raise TypeError(f"{type(self).__name__}: unknown hyperparameters {unknown}; known: {known}")
        if type(self).check is not None:
            defaults = {k: p.default for k, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}
            type(self).check(**{**defaults, **hparams})
        self.hparams = hparams

    def forward(self, *args, **kwargs):
        return type(self).fn(*args, **{**self.hparams, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
