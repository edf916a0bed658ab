"""Stage-1 supervised losses: SFT, and SFT with gentle negatives (SFT-C).

    SFT    = mean over response tokens of -log p(y_t)                 (optionally label-smoothed)
    SFT-C  = NLL(y+) + lam * relu(C - NLL(y-))        variant "hinge": stop pushing a negative once
                                                      its NLL exceeds the margin C
           = NLL(y+) + alpha * NLL(y-)                variant "extend": low-weight supervision on y-
    NLL    = batch-mean token NLL over response tokens
"""

from __future__ import annotations

import torch

from ..ops import token_stats
from ._common import (
    LossModule,
    accepts_packed,
    check_batch_time,
    check_choice,
    check_nonnegative,
    check_num_items,
    detached,
    masked_mean,
    response_mask,
)


def _check_sft(*, label_smoothing=0.0, temperature=1.0, **_):
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _nll_and_entropy(hidden, weight, labels, *, bias, temperature, ignore_index, backend, label_smoothing=0.0,
                     num_items_in_batch=None):
    """Batch-mean token NLL (label-smoothed if asked) and mean entropy over response tokens; the loss
    divides by num_items_in_batch when given (the nll metric stays this call's own mean)."""
    outputs = ("logp", "entropy") + (("lse",) if label_smoothing else ())
    r = token_stats(hidden, weight, labels, bias=bias, temperature=temperature, outputs=outputs,
                    ignore_index=ignore_index, backend=backend)
    mask = response_mask(labels, ignore_index)
    nll = masked_mean(-r.logp, mask)
    loss = nll if num_items_in_batch is None else masked_mean(-r.logp, mask, num_items_in_batch)
    if label_smoothing:
        # uniform target: mean_v(-log p_v) = lse - mean_v z_v, and mean_v z_v = (h . sum_v W_v + sum b) / (V T)
        V = weight.shape[0]
        z_mean = hidden.float() @ weight.sum(0, dtype=torch.float32)
        if bias is not None:
            z_mean = z_mean + bias.float().sum()
        z_mean = z_mean / (V * temperature)
        loss = (1 - label_smoothing) * loss + label_smoothing * masked_mean(r.lse - z_mean, mask, num_items_in_batch)
    return loss, nll, masked_mean(r.entropy, mask), mask


@accepts_packed()
def sft_loss(hidden, weight, labels, *, bias=None, label_smoothing=0.0, temperature=1.0, ignore_index=-100,
             backend="auto", num_items_in_batch=None):
    """Mean token NLL over response tokens.

    hidden [B, T, H], weight [V, H], labels [B, T] (shifted; -100 on prompt and padding).
    num_items_in_batch: divide the summed NLL by this token count instead of this call's own (a part
    of a larger batch: another rank's, another accumulation step's).
    Returns (loss, metrics) with metrics nll, entropy, tokens.
    """
    _check_sft(label_smoothing=label_smoothing, temperature=temperature)
    check_num_items(num_items_in_batch)
    check_batch_time(hidden, labels)
    loss, nll, entropy, mask = _nll_and_entropy(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        backend=backend, label_smoothing=label_smoothing, num_items_in_batch=num_items_in_batch,
    )
    return loss, detached(loss=loss, nll=nll, entropy=entropy, tokens=mask.sum())


def _check_gentle(*, variant="hinge", lam=0.1, margin=3.0, alpha=0.05, temperature=1.0, **_):
    check_choice("variant", variant, ("hinge", "extend"))
    check_nonnegative("lam", lam)
    check_nonnegative("margin", margin)
    check_nonnegative("alpha", alpha)
    _check_sft(temperature=temperature)


def sft_gentle_negatives_loss(hidden, weight, labels, neg_hidden, neg_labels, *, variant="hinge", lam=0.1,
                              margin=3.0, alpha=0.05, bias=None, temperature=1.0, ignore_index=-100,
                              backend="auto", mean_over_parts=None):
    """SFT-C: NLL(y+) + lam * relu(margin - NLL(y-)) ("hinge") or NLL(y+) + alpha * NLL(y-) ("extend").

    Positives: hidden [B, T, H], labels [B, T]; negatives: neg_hidden [B', T', H], neg_labels [B', T'].
    mean_over_parts: when this call holds one part of a batch (a data-parallel rank's), a function that
    averages a tensor over the parts (an all-reduce / world size). NLL(y+), NLL(y-) and the hinge's gate are
    then the whole batch's, and the loss is this part's share: the parts' losses (and gradients) average to
    the whole batch's, as DeepSpeed averages ranks. Metrics: nll_pos, nll_neg (this part's), hinge_active
    (1 while the hinge still pushes), entropy.
    """
    _check_gentle(variant=variant, lam=lam, margin=margin, alpha=alpha, temperature=temperature)
    check_batch_time(hidden, labels)
    check_batch_time(neg_hidden, neg_labels, "neg_hidden")
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, backend=backend)
    share = {}
    if mean_over_parts is not None:  # tokens per part, averaged: sum / this is the part's share of the mean
        for key, lab in (("pos", labels), ("neg", neg_labels)):
            share[key] = mean_over_parts(response_mask(lab, ignore_index).sum().to(hidden.device, torch.float32))
    pos, nll_pos, entropy, _ = _nll_and_entropy(hidden, weight, labels, num_items_in_batch=share.get("pos"), **kw)
    neg, nll_neg, _, _ = _nll_and_entropy(neg_hidden, weight, neg_labels, num_items_in_batch=share.get("neg"), **kw)
    if variant == "hinge":
        # relu(margin - NLL(y-)) of the whole batch, written as gate * (margin - this part's share)
        batch_nll_neg = neg.detach() if mean_over_parts is None else mean_over_parts(neg.detach())
        active = (margin - batch_nll_neg > 0).float()
        loss = pos + lam * active * (margin - neg)
    else:
        loss = pos + alpha * neg
        active = torch.ones(())
    return loss, detached(loss=loss, nll_pos=nll_pos, nll_neg=nll_neg, hinge_active=active, entropy=entropy)


class SFTLoss(LossModule):
    fn = staticmethod(sft_loss)
    check = staticmethod(_check_sft)


class SFTGentleNegativesLoss(LossModule):
    fn = staticmethod(sft_gentle_negatives_loss)
    check = staticmethod(_check_gentle)
