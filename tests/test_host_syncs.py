"""Host syncs on the hot path: one fused call reads from the device once (the count of counted tokens that sizes
the compacted GEMMs), and the trainer has its inputs' values checked (target ranges, NaN/inf: more syncs and a
pass over the inputs) on a stage's first step only."""

import pytest
import torch
from test_train import recipe
from torch.utils._python_dispatch import TorchDispatchMode

import vlmfast
from vlmfast import stage_loop as L
from vlmfast import stages as S
from vlmfast import train as T
from vlmfast.ops import _inputs, inputs_checked

HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default)


class HostReads(TorchDispatchMode):
    """The ops that copy a device value to the host (item, bool, nonzero's size, equal), and tolist calls."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = []
        real = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: self.reads.append("tolist") or real(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ignored", [0, 20])
def test_one_fused_call_reads_the_device_once(monkeypatch, ignored):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    W = torch.randn(1000, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 1000, (64,), generator=g)
    y[:ignored] = -100
    with inputs_checked(False):
        with HostReads(monkeypatch) as seen:
            s = vlmfast.token_stats(h, W, y, backend="chunked")
            s.logp.sum().backward()
        assert seen.reads == ["nonzero"]
        with HostReads(monkeypatch) as seen:
            loss, _ = vlmfast.token_loss(h, W, y, lambda st, index: -st["logp"], backend="chunked")
            loss.backward()
        assert seen.reads == ["nonzero"]
    with inputs_checked(True), HostReads(monkeypatch) as seen:  # checked: the value checks' reads besides
        vlmfast.token_stats(h, W, y, backend="chunked")
    assert len(seen.reads) > 1


def test_trainer_checks_values_on_the_first_step_of_each_stage_only(tmp_path, monkeypatch):
    events = []
    real_check = _inputs._check_finite
    monkeypatch.setattr(_inputs, "_check_finite", lambda *a: events.append("check") or real_check(*a))
    for name in ("sft", "grpo"):
        real = S.STAGES[name].step
        monkeypatch.setattr(S.STAGES[name], "step",
                            lambda ctx, step, real=real: events.append(f"step {ctx.index}:{step}") or real(ctx, step))
    real_eval = L.evaluate
    monkeypatch.setattr(L, "evaluate", lambda *a, **k: events.append("eval") or real_eval(*a, **k))
    stages = [{"type": "sft", "name": "sft", "steps": 3, "batch_size": 4},
              {"type": "grpo", "name": "grpo", "steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 4}]
    T.run(recipe(tmp_path, stages, eval={"at_start": False, "probes": 0}))
    steps = [i for i, e in enumerate(events) if e.startswith("step") or e == "eval"]
    # between a step's start and the next event: checks only in each stage's first step
    for a, b in zip(steps, steps[1:] + [len(events)]):
        checked = "check" in events[a + 1 : b]
        assert checked == (events[a] in ("step 0:0", "step 1:0", "eval")), (events[a], checked)
