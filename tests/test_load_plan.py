"""LoadPlan: a replay of load_weights' writes loads new weights exactly as load_weights itself would, and a
loader whose writes cannot be replayed exactly is never replayed.

The toy model loads like vLLM's Qwen2 (q, k, v stacked into one qkv parameter by narrow + copy_, an
embedding with padding rows filled, a skipped rotary buffer); the reference is a second copy of the model
loading every bucket through its own load_weights."""

import copy

import pytest
import torch
from torch import nn

from vlmfast.rollout.load_plan import LoadPlan

H, VOCAB, PADDED = 6, 11, 16


class StackedModel(nn.Module):
    def __init__(self, loader: str = "views"):
        super().__init__()
        self.qkv = nn.Parameter(torch.zeros(3 * H, H), requires_grad=False)
        self.embed = nn.Parameter(torch.full((PADDED, H), 7.0), requires_grad=False)
        self.norm = nn.Parameter(torch.zeros(H), requires_grad=False)
        self.loader = loader
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        for name, w in weights:
            if name.endswith("inv_freq"):
                continue
            if name in ("q", "k", "v"):
                shard = "qkv".index(name)
                dst = self.qkv.data.narrow(0, shard * H, H)
                if self.loader == "converts":
                    w = w.to(torch.float64)  # a computed copy: the replay could not see what it holds
                elif self.loader == "transposed":
                    w = w.t().t()  # views only: replayable
                dst.copy_(w)
            elif name == "embed":
                self.embed.data[: w.shape[0]].copy_(w)
                self.embed.data[w.shape[0]:].fill_(0)
            elif name == "norm":
                if self.loader == "rebinds":
                    self.norm.data = w  # aliases the sender's tensor: never replay
                elif self.loader == "scales_source":
                    w.mul_(1.0)
                    self.norm.data.copy_(w)
                else:
                    self.norm.data.copy_(w)


def _bucket(seed: int, names=("q", "k", "v", "embed", "norm", "rotary.inv_freq")) -> list:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "embed": (VOCAB, H), "norm": (H,), "rotary.inv_freq": (3,)}
    return [(n, torch.randn(*shapes[n], generator=g)) for n in names]


def _same(a: nn.Module, b: nn.Module):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("loader", ["views", "transposed"])
def test_replayed_loads_equal_load_weights(loader):
    model, reference = StackedModel(loader), StackedModel(loader)
    plan = LoadPlan(model)
    for seed, expect in [(0, "recorded"), (1, "replayed"), (2, "replayed")]:
        model.embed.data[VOCAB:] = 5.0  # the padding fill must be replayed too
        bucket = _bucket(seed)
        plan.load(bucket)
        reference.load_weights(_bucket(seed))
        assert plan.last == expect
        _same(model, reference)
    assert model.calls == 1  # the walk ran once; the replays only copied


def test_a_new_layout_is_recorded_on_its_own():
    model, reference = StackedModel(), StackedModel()
    plan = LoadPlan(model)
    plan.load(_bucket(0))
    plan.load(_bucket(1, names=("q", "norm")))  # a smaller bucket (only the trainable tensors, say)
    assert plan.last == "recorded"
    plan.load(_bucket(2, names=("q", "norm")))
    assert plan.last == "replayed"
    reference.load_weights(_bucket(0))
    reference.load_weights(_bucket(2, names=("q", "norm")))
    _same(model, reference)


def test_the_plan_follows_the_sent_tensors_not_their_addresses():
    """A replay reads the tensors it is given now (the shared buffer's views, ZeRO-3's freshly gathered
    parameters), wherever they live, including views at an offset into one flat buffer."""
    model, reference = StackedModel(), StackedModel()
    plan = LoadPlan(model)
    plan.load(_bucket(0))
    flat = torch.zeros(1000)
    bucket, off = [], 5
    for name, t in _bucket(1):
        bucket.append((name, flat[off: off + t.numel()].view(t.shape).copy_(t)))
        off += t.numel() + 3
    plan.load(bucket)
    assert plan.last == "replayed"
    reference.load_weights(_bucket(1))
    _same(model, reference)


@pytest.mark.parametrize("loader,why", [("converts", "not a view"), ("rebinds", "rebinds"),
                                        ("scales_source", "writes into a sent tensor")])
def test_a_loader_the_replay_cannot_repeat_always_runs_load_weights(loader, why):
    model, reference = StackedModel(loader), StackedModel(loader)
    plan = LoadPlan(model)
    plan.load(_bucket(0))
    (reason,) = plan.void.values()
    assert why in reason
    for seed in (1, 2):
        plan.load(_bucket(seed))
        assert plan.last != "replayed"  # "load_weights" (or "recorded" again, once a rebinding moved storage)
        reference.load_weights(_bucket(seed))
        if loader != "rebinds":  # a rebinding loader aliases the sender's tensors: compared by value below
            _same(model, reference)
    assert model.calls == 3
    assert torch.equal(model.qkv[:H], _bucket(2)[0][1])


def test_a_rebuilt_parameter_drops_the_plans():
    model = StackedModel()
    plan = LoadPlan(model)
    plan.load(_bucket(0))
    old = model.qkv
    model.qkv = nn.Parameter(torch.zeros_like(old), requires_grad=False)  # the recorded views point at `old`
    plan.load(_bucket(1))
    assert plan.last == "recorded"
    assert torch.equal(model.qkv[2 * H:], _bucket(1)[2][1])
    reference = copy.deepcopy(model)
    plan.load(_bucket(2))
    reference.load_weights(_bucket(2))
    assert plan.last == "replayed"
    _same(model, reference)
