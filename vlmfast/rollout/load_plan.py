"""Replaying a model's `load_weights` as the memory copies it made, so a weight sync costs its copies only.

vLLM's `load_weights` finds each incoming tensor's destination by walking the model's modules in Python
(name mapping, stacked q/k/v and gate/up shards, skips): a fixed few milliseconds per sync that a small
model's copies cannot hide. A sync sends the same bucket every time (same names, shapes, dtypes), so the
walk's result is the same every time too. `LoadPlan` runs `load_weights` once per bucket layout under a
torch function mode that records every in-place write (the `copy_` into a narrowed parameter, the `fill_`
of padding rows) and where its source lies inside the incoming tensors; later syncs of that layout repeat
those writes with the new tensors, nothing else.

The plan is kept only where replaying it is exact: every write's tensor arguments are views of the
incoming tensors (no converted or computed copy of them), no incoming tensor is written to, no parameter is
rebound (`.data =`, `set_`, `out=`), and every written tensor lives in one of the model's parameters or
buffers. A loader that does anything else makes the bucket's plan void: that layout always goes through
`load_weights`. A change of the model's parameter storage (a rebuilt parameter) drops every plan.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class _Source:
    """An argument that is a view of the bucket's i-th tensor: replayed as the same view of its successor."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, view: torch.Tensor, base: torch.Tensor):
        self.index = index
        self.size, self.stride = tuple(view.shape), view.stride()
        self.offset = (view.data_ptr() - base.data_ptr()) // base.element_size()

    def view_of(self, base: torch.Tensor) -> torch.Tensor:
        return base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)


class _Void(Exception):
    """Load_weights did something a replay of its writes could not repeat exactly."""


def _is_write(name: str) -> bool:
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


class _Recorder(TorchFunctionMode):
    def __init__(self, bucket: list):
        super().__init__()
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i, t)
                       for i, (_, t) in enumerate(bucket) if t.numel()]
        self.writes: list = []  # (func, destination, args after it, kwargs)
        self.void: str | None = None

    def _source(self, x: torch.Tensor) -> _Source | None:
        p = x.data_ptr()
        for lo, hi, i, t in self.ranges:
            if lo <= p < hi:
                if x.dtype != t.dtype:
                    raise _Void(f"a source read as {x.dtype}, sent as {t.dtype}")
                return _Source(i, x, t)
        return None

    def _template(self, a):
        if isinstance(a, torch.Tensor):
            src = self._source(a)
            if src is None:
                raise _Void("a write reads a tensor that is not a view of the sent weights")
            return src
        if isinstance(a, (tuple, list)):
            return type(a)(self._template(b) for b in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.void is None:
            try:
                if name in ("__set__", "set_") or "out" in kwargs:
                    raise _Void(f"load_weights rebinds or writes through {name or func}")
                if _is_write(name) and args and isinstance(args[0], torch.Tensor):
                    dst = args[0]
                    if self._source(dst) is not None:
                        raise _Void(f"load_weights writes into a sent tensor ({name})")
                    self.writes.append((func, dst, self._template(tuple(args[1:])),
                                        {k: self._template(v) for k, v in kwargs.items()}))
            except _Void as e:
                self.void = str(e)
        return func(*args, **kwargs)


def _fill(a, bucket: list):
    if isinstance(a, _Source):
        return a.view_of(bucket[a.index][1])
    if isinstance(a, (tuple, list)):
        return type(a)(_fill(b, bucket) for b in a)
    return a


def _layout(bucket: list) -> tuple:
    return tuple((n, tuple(t.shape), t.stride(), t.dtype) for n, t in bucket)


class LoadPlan:
    """`plan.load(bucket)` loads `bucket` into `model` exactly as `model.load_weights(bucket)` would; the
    first bucket of each layout through `load_weights` (recorded), later ones by replaying its writes.
    `last` says which: "recorded", "replayed" or "load_weights" (a void plan) — and `void` why."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = list(model.modules())  # walked once: a sync looks at their tensors directly
        self.plans: dict[tuple, list | None] = {}
        self.void: dict[tuple, str] = {}
        self.storage = self._storage()
        self.last = ""

    def _tensors(self) -> list:
        return [t for m in self.modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]

    def _storage(self) -> tuple:
        return tuple(t.data_ptr() for t in self._tensors())

    def _owned(self, writes: list) -> bool:
        """Whether every write's destination lies in one of the model's parameters or buffers."""
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in self._tensors()]
        return all(any(lo <= dst.data_ptr() < hi for lo, hi in spans) for _, dst, _, _ in writes)

    def load(self, bucket: list) -> None:
        bucket = list(bucket)
        storage = self._storage()
        if storage != self.storage:  # a parameter was rebuilt: recorded destinations may be orphans
            self.plans.clear()
            self.storage = storage
        key = _layout(bucket)
        if key in self.plans:
            writes = self.plans[key]
            if writes is None:
                self.model.load_weights(weights=bucket)
                self.last = "load_weights"
                return
            with torch.no_grad():
                for func, dst, args, kwargs in writes:
                    func(dst, *_fill(args, bucket), **{k: _fill(v, bucket) for k, v in kwargs.items()})
            self.last = "replayed"
            return
        recorder = _Recorder(bucket)
        with recorder:
            self.model.load_weights(weights=bucket)
        void, after = recorder.void, self._storage()
        if void is None and after != storage:
            void = "load_weights rebuilt a parameter"
        if void is None and not self._owned(recorder.writes):
            void = "load_weights wrote into a tensor the model does not hold"
        self.plans[key] = None if void else recorder.writes
        if void:
            self.void[key] = void
        self.storage = after
        self.last = "recorded"
