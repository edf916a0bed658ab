"""The buffer a vLLM engine in another process reads synced weights from (`rollout.weight_sync.SharedBuffer`):
another process maps the same memory from the handle (shared memory on the CPU, CUDA IPC on a GPU), reads
exactly what was packed, and what it writes is seen here: one mapping, no copy. The CUDA case runs where a GPU
is (`make gpu-check` runs this file); the CPU case everywhere."""

import subprocess
import sys
import textwrap

import pytest
import torch

from vlmfast.rollout.weight_sync import SharedBuffer, bucket_bytes

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="CUDA IPC needs a GPU (make gpu-check)"))]


def _bucket(device):
    g = torch.Generator().manual_seed(3)
    return [("a.weight", torch.randn(37, 11, generator=g).to(device)),
            ("b.bias", torch.randn(13, generator=g).to(torch.bfloat16).to(device)),
            ("c.count", torch.arange(5, dtype=torch.int64, device=device))]


CHILD = textwrap.dedent("""
    import pickle, sys, torch
    from vlmfast.rollout.weight_sync import open_shared, unpack
    handle, layout, want = pickle.load(open(sys.argv[1], "rb"))
    views = dict(unpack(open_shared(handle), layout))
    for name, t in want.items():
        v = views[name]
        assert v.dtype == t.dtype and v.shape == t.shape, (name, v.dtype, v.shape)
        assert torch.equal(v.cpu(), t), name
    views["c.count"].fill_(-7)  # written through the mapping: the parent must see it
    if views["c.count"].is_cuda:
        torch.cuda.synchronize()
    print("child-ok")
""")


@pytest.mark.parametrize("device", DEVICES)
def test_another_process_maps_the_same_memory(device, tmp_path):
    import pickle

    bucket = _bucket(device)
    buf = SharedBuffer(bucket_bytes(bucket) + 64, device)
    layout = buf.pack(bucket)
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((buf.handle, layout, {n: t.cpu() for n, t in bucket})))
    res = subprocess.run([sys.executable, "-c", CHILD, str(args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "child-ok" in res.stdout, res.stderr[-2000:]
    offset = layout[2][3]
    seen = buf.tensor[offset : offset + 5 * 8].view(torch.int64)
    assert seen.tolist() == [-7] * 5  # the child's write landed in this process's buffer


def test_a_bucket_larger_than_the_buffer_is_refused():
    bucket = _bucket("cpu")
    buf = SharedBuffer(64, "cpu")
    with pytest.raises(ValueError, match="does not fit"):
        buf.pack(bucket)
