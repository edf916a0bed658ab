"""TRL integration tests: run in TRL's venv (`make test-trl`: .venv-trl joins the main venv's packages and adds
TRL 1.16). The Triton interpreter is off: TRL's own fused head (the reference here) runs its PyTorch path."""

import collections
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def head_calls(monkeypatch):
    """Counts, by "Class.method", the fused head's autograd Functions run: vlmfast's one pass (token_loss:
    FusedLinearTokenLoss, its gradients made in the forward) and token_stats (FusedLinearTokenStats, whose backward
    recomputes the head)."""
    from vlmfast.ops import function, one_pass

    calls = collections.Counter()

    def spy(cls, name):
        original = getattr(cls, name)

        def counted(*args, **kwargs):
            calls[f"{cls.__name__}.{name}"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, staticmethod(counted))

    spy(one_pass.FusedLinearTokenLoss, "forward")
    spy(function.FusedLinearTokenStats, "forward")
    spy(function.FusedLinearTokenStats, "backward")
    return calls
