"""Stage-1 supervised losses: SFT, and SFT with gentle negatives (SFT-C).

    SFT    = mean over response tokens of -log p(y_t)                 (optionally label-smoothed)
    SFT-C  = NLL(y+) + lam * mean_i relu(C - NLL_i(y-))  variant "hinge": stop pushing negative i once
                                                         its NLL exceeds the margin C
           = NLL(y+) + alpha * NLL(y-)                   variant "extend": low-weight supervision on y-
    NLL(y+)   = batch-mean token NLL over the positives' response tokens
    NLL_i(y-) = mean NLL of negative i's tokens after the prefix it shares with its positive y+_i;
    NLL(y-)   = the token mean of those tokens over the batch

A negative usually shares most of its positive (the same reasoning, another answer): counting the shared
tokens would push the gold prefix down with the negative. Negatives equal to their positive push nothing.
"""

from __future__ import annotations

import torch

from ..ops import token_loss
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
    token_count,
)


def _check_sft(*, label_smoothing=0.0, temperature=1.0, **_):
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _nll_and_entropy(hidden, weight, labels, *, bias, temperature, ignore_index, backend, label_smoothing=0.0,
                     num_items_in_batch=None):
    """Batch-mean token NLL (label-smoothed if asked) and mean entropy over response tokens; the loss
    divides by num_items_in_batch when given (the nll metric stays this call's own mean). One pass
    (token_loss): each token's gradient is known once its own statistics are."""
    mask = response_mask(labels, ignore_index)
    count = token_count(mask, num_items_in_batch)
    eps = label_smoothing

    def per_token(s, index):
        # uniform target: mean_v(-log p_v) = lse - mean_v z_v; the mean_v z_v part is linear in h and W (below)
        nll_t = -s["logp"]
        return ((1 - eps) * nll_t + eps * s["lse"] if eps else nll_t) / count

    loss, r = token_loss(hidden, weight, labels, per_token, bias=bias, temperature=temperature,
                         ignore_index=ignore_index, backend=backend)
    if eps:
        # mean_v z_v = (h . sum_v W_v + sum b) / (V T)
        V = weight.shape[0]
        z_mean = hidden.float() @ weight.sum(0, dtype=torch.float32)
        if bias is not None:
            z_mean = z_mean + bias.float().sum()
        z_mean = z_mean / (V * temperature)
        loss = loss - eps * masked_mean(z_mean, mask, num_items_in_batch)
    return loss, masked_mean(-r.logp, mask), masked_mean(r.entropy, mask), mask


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


def divergent_tokens(labels: torch.Tensor, neg_labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T'] mask of each negative's response tokens after the prefix it shares with its positive (row i of
    `labels`, the same example): response tokens are compared in order, wherever each row's response starts."""
    pos_mask, neg_mask = response_mask(labels, ignore_index), response_mask(neg_labels, ignore_index)
    width = max(labels.shape[1], neg_labels.shape[1])

    def packed(lab, mask, fill):  # each row's response tokens first, in order, then `fill`
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        toks = torch.where(mask, lab, fill).gather(1, order)
        return torch.nn.functional.pad(toks, (0, width - toks.shape[1]), value=fill)

    same = packed(labels, pos_mask, -1) == packed(neg_labels, neg_mask, -2)  # fills never match
    shared = same.long().cumprod(1).sum(1)  # [B] tokens of the shared prefix
    rank = neg_mask.long().cumsum(1) - 1  # place of each negative token within its response
    return neg_mask & (rank >= shared[:, None])


def sft_gentle_negatives_loss(hidden, weight, labels, neg_hidden, neg_labels, *, variant="hinge", lam=0.1,
                              margin=3.0, alpha=0.05, bias=None, temperature=1.0, ignore_index=-100,
                              backend="auto", mean_over_parts=None, normalizers=None):
    """SFT-C: NLL(y+) + lam * mean_i relu(margin - NLL_i(y-)) ("hinge") or NLL(y+) + alpha * NLL(y-) ("extend"),
    the negatives' NLL over their tokens after the prefix shared with their positive (module docstring).

    Positives: hidden [B, T, H], labels [B, T]; negatives: neg_hidden [B, T', H], neg_labels [B, T'], row i the
    negative of positive i (same prompt). mean_over_parts: when this call holds one part of a batch (a
    data-parallel rank's), a function that averages a tensor over the parts (an all-reduce / world size): the
    token and sequence means are then the whole batch's and the loss is this part's share, so the parts'
    losses (and gradients) average to the whole batch's, as DeepSpeed averages ranks. normalizers: what the means
    divide by, precomputed (gentle_normalizers) on a larger batch this call is a micro-batch of (then
    mean_over_parts is not used): the micro-batches' losses add up to that batch's. Metrics: nll_pos, nll_neg
    (this part's divergent-token mean), hinge_active (share of this part's negatives still pushed), shared_tokens
    (mean shared prefix), entropy.
    """
    _check_gentle(variant=variant, lam=lam, margin=margin, alpha=alpha, temperature=temperature)
    check_batch_time(hidden, labels)
    check_batch_time(neg_hidden, neg_labels, "neg_hidden")
    if neg_labels.shape[0] != labels.shape[0]:
        raise ValueError(f"negatives pair with positives row for row: {labels.shape[0]} positives but "
                         f"{neg_labels.shape[0]} negatives")
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, backend=backend)
    own = divergent_tokens(labels, neg_labels, ignore_index)
    norms = normalizers or gentle_normalizers(labels, neg_labels, ignore_index=ignore_index,
                                              mean_over_parts=mean_over_parts)
    norms = {k: torch.as_tensor(v, dtype=torch.float32, device=hidden.device) for k, v in norms.items()}
    pos, nll_pos, entropy, _ = _nll_and_entropy(hidden, weight, labels, num_items_in_batch=norms["positive_tokens"],
                                                **kw)
    neg_target = torch.where(own, neg_labels, ignore_index)
    if variant == "extend":  # a token mean: one pass
        scale = alpha / norms["negative_tokens"]
        penalty, r = token_loss(neg_hidden, weight, neg_target, lambda s, index: -s["logp"] * scale, **kw)
    else:  # each negative's hinge reads its own tokens' sum: one pass with a group per negative
        Tn, rows = neg_labels.shape[1], norms["pushed"]

        def hinge_losses(s, index):
            seq_logp = s["logp"].new_zeros(own.shape[0]).index_add(0, index // Tn, s["logp"])
            return lam * hinge_push(seq_logp, own, margin) / rows

        group = torch.arange(own.shape[0], device=neg_target.device)[:, None].expand_as(neg_target)
        penalty, r = token_loss(neg_hidden, weight, neg_target, hinge_losses, groups=group, **kw)
    m = gentle_metrics(r.logp, own, variant=variant, margin=margin)
    loss = pos + penalty
    m["shared_tokens"] = (response_mask(neg_labels, ignore_index).sum(1) - own.sum(1)).float().mean()
    return loss, detached(loss=loss, nll_pos=nll_pos, entropy=entropy, **m)


def hinge_push(seq_logp: torch.Tensor, own: torch.Tensor, margin: float) -> torch.Tensor:
    """[B] relu(margin - NLL_i(y-)) from each negative's summed log-prob over its own tokens; 0 for a negative
    with none (equal to its positive: nothing of its own to push)."""
    counts = own.sum(1).to(seq_logp.device)
    return torch.relu(margin + seq_logp / counts.clamp(min=1)) * (counts > 0)


def gentle_normalizers(labels, neg_labels, *, ignore_index=-100, mean_over_parts=None) -> dict:
    """What sft_gentle_negatives_loss's means divide by: the positives' response tokens (positive_tokens), the
    negatives with tokens of their own (pushed: the hinge's mean) and those tokens (negative_tokens: extend's); with
    mean_over_parts (a batch split over ranks) the whole batch's mean count per part (one collective for the three,
    outside the loss's bands). A rank's batch also split in micro-batches computes them once, on its whole batch."""
    own = divergent_tokens(labels, neg_labels, ignore_index)
    counts = torch.stack([response_mask(labels, ignore_index).sum(), (own.sum(1) > 0).sum(), own.sum()]).float()
    counts = counts.clamp(min=1) if mean_over_parts is None else mean_over_parts(counts).clamp(min=1e-12)
    return dict(zip(("positive_tokens", "pushed", "negative_tokens"), counts.unbind()))


def gentle_metrics(neg_logp: torch.Tensor, own: torch.Tensor, *, variant: str, margin: float) -> dict:
    """nll_neg (this part's token mean over the negatives' own tokens) and hinge_active (the share of its
    negatives with tokens of their own that the hinge still pushes)."""
    nll_neg = masked_mean(-neg_logp, own)
    if variant != "hinge":
        return {"nll_neg": nll_neg, "hinge_active": torch.ones(())}
    pushed = own.sum(1) > 0
    active = (hinge_push((neg_logp * own).sum(1), own, margin) > 0).sum() / pushed.sum().clamp(min=1)
    return {"nll_neg": nll_neg, "hinge_active": active.float()}


class SFTLoss(LossModule):
    fn = staticmethod(sft_loss)
    check = staticmethod(_check_sft)


class SFTGentleNegativesLoss(LossModule):
    fn = staticmethod(sft_gentle_negatives_loss)
    check = staticmethod(_check_gentle)
