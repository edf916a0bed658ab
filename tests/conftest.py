"""Test set-up: Triton's interpreter must be on before any @triton.jit module is imported, and
nothing may reach a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_native_switch():
    """VLMFAST_NATIVE is read at every op call; a test that sets it (the bench providers do) must
    not change which path the next test runs."""
    from bench._runner import keep_native_switch

    with keep_native_switch():
        yield
