"""A batch split into parts (data-parallel ranks) trains exactly as the whole batch.

DeepSpeed averages the ranks' losses (their gradients). A token mean per rank then gives a mean of
per-rank means, which is not the batch's token mean when ranks hold different token counts. Each part
divides its token sums by the whole batch's count over the number of parts (`num_items_in_batch`, TRL's
"dapo" normalisation), or, for SFT with gentle negatives, averages what it needs over the parts
(`mean_over_parts`): then the parts' losses and gradients average to the whole batch's. Parts here hold
very different token counts, so the plain per-part mean is measurably wrong (checked too).
"""

import threading

import pytest
import torch

from vlmfast import grpo_loss, opd_loss, sft_gentle_negatives_loss, sft_loss

B, T, H, V = 4, 9, 16, 37
PARTS = (slice(0, 2), slice(2, 4))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(V, (B, T), generator=g)
    # part 0 holds 2 + 3 response tokens, part 1 holds 8 + 9: per-part means weigh tokens differently
    for b, n in enumerate((2, 3, 8, 9)):
        y[b, n:] = -100
    return h, w, y


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _check_split(whole_fn, part_fn):
    """whole_fn(h, w) -> loss on the whole batch; part_fn(h, w, sl, n) -> loss of part sl given the
    whole batch's token count n over the number of parts (None: the part's own mean)."""
    h, w, y = _batch()
    h.requires_grad_(True)
    w.requires_grad_(True)
    whole = whole_fn(h, w, y)
    n = (y != -100).sum().double() / len(PARTS)
    split = sum(part_fn(h, w, y, sl, n) for sl in PARTS) / len(PARTS)
    naive = sum(part_fn(h, w, y, sl, None) for sl in PARTS) / len(PARTS)
    torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-12)
    for a, b in zip(_grads(split, h, w), _grads(whole, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # label smoothing sums W in fp32
    assert abs((naive - whole).item()) > 1e-3 * abs(whole.item())  # what the parts would train without it


def test_sft_token_mean_over_parts():
    _check_split(lambda h, w, y: sft_loss(h, w, y)[0],
                 lambda h, w, y, sl, n: sft_loss(h[sl], w, y[sl], num_items_in_batch=n)[0])


def test_sft_label_smoothing_over_parts():
    _check_split(lambda h, w, y: sft_loss(h, w, y, label_smoothing=0.1)[0],
                 lambda h, w, y, sl, n: sft_loss(h[sl], w, y[sl], label_smoothing=0.1, num_items_in_batch=n)[0])


def test_grpo_token_mean_over_parts():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    kw = dict(kl_coef=0.1, entropy_coef=0.01)
    _check_split(lambda h, w, y: grpo_loss(h, w, y, old, adv, ref_logp=ref, **kw)[0],
                 lambda h, w, y, sl, n: grpo_loss(h[sl], w, y[sl], old[sl], adv[sl], ref_logp=ref[sl],
                                                  num_items_in_batch=n, **kw)[0])


def test_grpo_num_items_only_for_token_mean():
    h, w, y = _batch()
    with pytest.raises(ValueError, match="token-mean"):
        grpo_loss(h, w, y, torch.zeros(B, T, dtype=h.dtype), torch.zeros(B), aggregation="seq-mean-token-mean",
                  num_items_in_batch=10)


@pytest.mark.parametrize("bad", [0, -3, float("nan"), True, torch.ones(2)])
def test_num_items_in_batch_must_be_a_count(bad):
    h, w, y = _batch()
    with pytest.raises(ValueError, match="num_items_in_batch"):
        sft_loss(h, w, y, num_items_in_batch=bad)


def test_opd_full_kl_over_parts():
    g = torch.Generator().manual_seed(2)
    th = torch.randn(B, T, 8, generator=g, dtype=torch.float64)
    tw = torch.randn(V, 8, generator=g, dtype=torch.float64) * 0.3
    _check_split(lambda h, w, y: opd_loss(h, w, y, teacher=(th, tw))[0],
                 lambda h, w, y, sl, n: opd_loss(h[sl], w, y[sl], teacher=(th[sl], tw), num_items_in_batch=n)[0])


class _ThreadAllReduce:
    """mean_over_parts for parts run in threads: each part's tensor is averaged with the others', as an
    all-reduce / world size across ranks would."""

    def __init__(self, parts: int):
        self.barrier = threading.Barrier(parts)
        self.slots = [None] * parts
        self.local = threading.local()

    def __call__(self, x):
        self.slots[self.local.index] = x.detach().clone()
        self.barrier.wait()
        out = sum(self.slots) / len(self.slots)
        self.barrier.wait()
        return out


def _gentle_parts(h, w, y, nh, ny, **kw):
    reduce = _ThreadAllReduce(len(PARTS))
    out = [None] * len(PARTS)

    def part(i, sl):
        reduce.local.index = i
        out[i] = sft_gentle_negatives_loss(h[sl], w, y[sl], nh[sl], ny[sl], mean_over_parts=reduce, **kw)

    threads = [threading.Thread(target=part, args=(i, sl)) for i, sl in enumerate(PARTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("variant", ["hinge", "extend"])
def test_gentle_negatives_over_parts(variant):
    h, w, y = _batch(0)
    nh, _, ny = _batch(3)
    ny[:2, 1:] = -100  # the negatives' parts hold 1 + 1 and 8 + 9 tokens
    h.requires_grad_(True)
    w.requires_grad_(True)
    own = [sft_gentle_negatives_loss(h[sl], w, y[sl], nh[sl], ny[sl], variant=variant)[1]["nll_neg"] for sl in PARTS]
    # a margin between the parts' NLL(y-): per-part hinges disagree, only the batch's NLL(y-) decides
    kw = dict(variant=variant, lam=0.7, alpha=0.3, margin=float(sum(own) / 2))
    whole, m = sft_gentle_negatives_loss(h, w, y, nh, ny, **kw)
    parts = _gentle_parts(h, w, y, nh, ny, **kw)
    split = sum(loss for loss, _ in parts) / len(parts)
    torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-12)
    for a, b in zip(_grads(split, h, w), _grads(whole, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert all(pm["hinge_active"] == m["hinge_active"] for _, pm in parts)  # the batch's gate on every part
    naive = sum(sft_gentle_negatives_loss(h[sl], w, y[sl], nh[sl], ny[sl], **kw)[0] for sl in PARTS) / 2
    assert abs((naive - whole).item()) > 1e-3 * abs(whole.item())
