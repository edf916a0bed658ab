"""Moving the trainer's weights into a generation engine without files.

    weight_buckets(model, cap)     [(name, tensor)] lists of at most `cap` bytes, each gathered only
                                   while it is used under ZeRO-3 (never the whole model at once); a LoRA
                                   model's adapted layers merged a bucket at a time
    SharedBuffer(nbytes, device)   one buffer an engine in another process maps once (CUDA IPC on a
                                   GPU, shared memory on the CPU); each bucket is one copy into it

An engine in this process (vLLM's in-process executor) gets the bucket's tensors by reference: the
only copy is vLLM's own `param.copy_(loaded)`. An engine in another process gets the bucket through the
shared buffer: one copy in, one copy out. A 7B policy in bf16 syncs as ~15 GB of memory copies, not
~15 GB written to and read back from disk per rank.
"""

from __future__ import annotations

import io
import pickle

import torch

from ..lora import served_tensors
from ..zero import gathered

ALIGN = 64  # bytes: every tensor in the shared buffer starts at an offset its dtype can view


def _nbytes(param: torch.Tensor) -> int:
    """Bytes of the whole parameter as sent (under ZeRO-3 `param` holds a shard: its full size is ds_numel; a 4-bit
    weight is sent dequantized, at its quant state's shape and dtype)."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return torch.Size(state.shape).numel() * state.dtype.itemsize
    return getattr(param, "ds_numel", param.numel()) * param.element_size()


def weight_buckets(model: torch.nn.Module, cap: int, *, trainable_only: bool = True):
    """Yield lists of (name, tensor) of about `cap` bytes (a larger tensor alone), in parameter order, named as the
    base model's: the parameters training changes (`trainable_only`; a LoRA model's adapted layers, merged:
    lora.served_tensors) or all of them. Each bucket's parameters are gathered only while it is used under ZeRO-3
    (never the whole model at once); its tensors are the parameters' own storage (detached) or a merged layer's,
    valid until the next bucket is requested."""
    group, size = [], 0
    tensors = served_tensors(model, changed_only=trainable_only)
    for i, (name, params, value) in enumerate(tensors):
        group.append((name, params, value))
        size += _nbytes(params[0])
        if size >= cap or i == len(tensors) - 1:
            with gathered([p for _, ps, _ in group for p in ps]):
                yield [(n, v()) for n, _, v in group]
            group, size = [], 0


def shared_buffer_bytes(model: torch.nn.Module, cap: int) -> int:
    """Room for any bucket weight_buckets makes: it closes once past `cap` (or at the model's end), so it
    holds at most that plus its last (largest possible) tensor, and each tensor's alignment padding."""
    sizes = [_nbytes(p) for p in model.parameters()]
    return min(cap, sum(sizes)) + max(sizes) + ALIGN * len(sizes)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def bucket_bytes(bucket: list) -> int:
    return sum(_align(t.numel() * t.element_size()) for _, t in bucket)


class SharedBuffer:
    """A byte buffer on `device` that another process maps once from `handle` (bytes: a pickled CUDA IPC
    handle, or on the CPU a shared-memory file name). `pack` copies a bucket in and returns its layout
    [(name, dtype, shape, offset)], which `unpack` turns back into views on the receiving side."""

    def __init__(self, nbytes: int, device):
        self.tensor = torch.empty(_align(nbytes), dtype=torch.uint8, device=device)
        self.handle = share(self.tensor)

    def pack(self, bucket: list) -> list:
        if bucket_bytes(bucket) > self.tensor.numel():
            raise ValueError(f"a bucket of {bucket_bytes(bucket)} B does not fit the {self.tensor.numel()} B buffer")
        layout, offset = [], 0
        for name, t in bucket:
            n = t.numel() * t.element_size()
            self.tensor[offset : offset + n].view(t.dtype).view(t.shape).copy_(t)
            layout.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset))
            offset = _align(offset + n)
        if self.tensor.is_cuda:  # the receiver reads it from another process's stream
            torch.cuda.current_stream(self.tensor.device).synchronize()
        return layout


def unpack(buffer: torch.Tensor, layout: list) -> list:
    """Views of `buffer` named as `layout` says (what SharedBuffer.pack wrote)."""
    out = []
    for name, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        n = dt.itemsize * int(torch.Size(shape).numel())
        out.append((name, buffer[offset : offset + n].view(dt).view(shape)))
    return out


def share(tensor: torch.Tensor) -> bytes:
    """A handle another process opens with `open_shared` to map the same memory (no copy)."""
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import get_sharing_strategy, set_sharing_strategy

    strategy = get_sharing_strategy()
    # a file descriptor only travels over a multiprocessing connection; a shared-memory name travels anywhere
    set_sharing_strategy("file_system")
    try:
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(tensor)
        return buf.getvalue()
    finally:
        set_sharing_strategy(strategy)


def open_shared(handle: bytes) -> torch.Tensor:
    return pickle.loads(handle)
