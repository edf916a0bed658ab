"""DPO and Cooling-Weighted DPO on sequence log-probs from the fused op (per-sequence sums).

    S(y)  = sum of response-token log-probs,   lbar(y) = S(y) / |y|
    Dw    = S_pi(yw) - S_ref(yw),              Dl = S_pi(yl) - S_ref(yl)
    DPO    = -log sigmoid(beta (Dw - Dl))
    CW-DPO = -log sigmoid(beta (Dw - w_c Dl)),  w_c = sigmoid((lbar_pi(yl) - l_floor) / tau_c)
             w_c is a stop-gradient local constant: easy negatives (lbar << l_floor) get w_c ~ 0 and
             stop being pushed down; hard ones get w_c ~ 1.

Chosen and rejected come in one batch: rows [:B] of hidden/labels are the chosen responses, rows
[B:] the rejected ones (one fused-op call for both). A pair's loss reads only its two sequences' sums, so the
lm_head runs one pass (token_loss with a group per pair: each band holds whole pairs, 3 GEMMs); with
l_floor="batch" every pair reads the batch's mean, so the batch is one group (one pass while it fits in a band).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import sequence_mean, token_loss
from ._common import (
    LossModule,
    accepts_packed,
    check_batch_time,
    check_positive,
    check_shape,
    detached,
    masked_mean,
    response_mask,
)

# ---- the cooling weight and its floor: the one place either is written -------------------------------------------

def cooling_weight(mean_logp: torch.Tensor, l_floor, tau: float) -> torch.Tensor:
    """CW-DPO's weight of a negative, w_c = sigmoid((lbar_pi(yl) - l_floor) / tau_c): a stop-gradient local
    constant. Easy negatives (mean log-prob far below l_floor) get w_c ~ 0 and stop being pushed down; hard ones
    (lbar at or above the floor) get w_c >= 0.5."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.sigmoid((mean_logp.detach().float() - l_floor) / tau)


# "batch": the mean lbar of this batch's rejected responses (batch_floor); "auto": the mean lbar of the dataset's
# negatives under the policy at stage start, resolved once by the trainer (auto_floor)
L_FLOOR_RULES = ("batch", "auto")


def l_floor_problem(l_floor, *, trainer=False) -> str | None:
    """What is wrong with l_floor, or None: a number or one of L_FLOOR_RULES ("auto" only where a trainer
    resolves it at stage start)."""
    rules = [r for r in L_FLOOR_RULES if trainer or r != "auto"]
    if l_floor in rules or isinstance(l_floor, (int, float)) and not isinstance(l_floor, bool):
        return None
    return f"must be a number or {' or '.join(map(repr, rules))}, got {l_floor!r}"


def check_l_floor(l_floor):
    problem = l_floor_problem(l_floor)
    if problem:
        raise ValueError(f"l_floor {problem}")


def batch_floor(lbar_rejected: torch.Tensor, l_floor):
    """The floor a batch's weights use: the number, or ("batch") the batch's mean rejected lbar (detached)."""
    return lbar_rejected.detach().mean() if l_floor == "batch" else float(l_floor)


def auto_floor(lbar_negatives) -> float:
    """l_floor: auto, resolved once at stage start from the negatives' mean log-probs under the starting policy:
    their mean, so about half of the negatives start below the floor (w_c < 0.5)."""
    lbar_negatives = list(lbar_negatives)
    if not lbar_negatives:
        raise ValueError("l_floor: auto needs at least one negative to measure")
    return sum(lbar_negatives) / len(lbar_negatives)


def _check_dpo(*, beta=0.1, temperature=1.0, **_):
    check_positive("beta", beta)
    check_positive("temperature", temperature)


def _check_cw_dpo(*, beta=0.1, tau_c=0.5, l_floor="batch", temperature=1.0, **_):
    _check_dpo(beta=beta, temperature=temperature)
    check_positive("tau_c", tau_c)
    check_l_floor(l_floor)


def _preference_loss(hidden, weight, labels, ref_chosen, ref_rejected, *, beta, cooling=None, bias, temperature,
                     ignore_index, backend):
    """-log sigmoid(beta (Dw - w Dl)) averaged over pairs, w = 1 (DPO) or cooling(S_pi(yl), |yl|) (CW-DPO: a
    number l_floor, or the batch mean's for None), through token_loss. Returns (loss, S [2B], lbar [2B], d_w, d_l,
    B, w, mean entropy over the response tokens) with S and what follows detached (metrics)."""
    rows, T = check_batch_time(hidden, labels)
    if rows % 2:
        raise ValueError(f"chosen and rejected must have the same batch size: hidden has {rows} rows "
                         "(expected [chosen; rejected], 2B rows)")
    B = rows // 2
    check_shape("ref_chosen_logps", ref_chosen, (B,), "reference sequence log-prob of each chosen response")
    check_shape("ref_rejected_logps", ref_rejected, (B,), "reference sequence log-prob of each rejected response")
    mask = response_mask(labels, ignore_index)
    counts = mask.sum(1)  # [2B]
    ref = torch.cat([ref_chosen.detach(), ref_rejected.detach()]).to(labels.device)
    whole_batch = cooling is not None and cooling.floor == "batch"  # every pair reads every other

    def pair_terms(S):  # S [2B] sequence sums -> (d_w, d_l, w)
        d = S - ref.to(S.dtype)
        w = 1.0 if cooling is None else cooling(sequence_mean(S[B:], counts[B:].to(S.device)))
        return d[:B], d[B:], w

    def pair_losses(s, index):  # the pairs' losses from these tokens' log-probs (whole pairs: token_loss's groups)
        d_w, d_l, w = pair_terms(s["logp"].new_zeros(2 * B).index_add(0, index // T, s["logp"]))
        losses = -F.logsigmoid(beta * (d_w - w * d_l)) / B
        return losses.sum(0, keepdim=True) if whole_batch else losses

    pair = torch.arange(rows, device=labels.device).remainder(B)[:, None].expand(rows, T)
    loss, r = token_loss(hidden, weight, labels, pair_losses, groups=torch.zeros_like(pair) if whole_batch else pair,
                         bias=bias, temperature=temperature, ignore_index=ignore_index, backend=backend)
    S = r.logp.sum(-1)  # 0 on ignored tokens
    d_w, d_l, w = pair_terms(S)
    return loss, S, sequence_mean(S, counts.to(S.device)), d_w, d_l, B, w, masked_mean(r.entropy, mask)


class _Cooling:
    """The weights w_c of a batch's rejected responses for a number l_floor or "batch"."""

    def __init__(self, floor, tau_c):
        self.floor, self.tau_c = floor, tau_c

    def __call__(self, lbar_rejected):
        return cooling_weight(lbar_rejected, batch_floor(lbar_rejected, self.floor), self.tau_c)


def _metrics(loss, beta, d_w, d_l, S, lbar, B, entropy, **extra):
    with torch.no_grad():
        rw, rl = beta * d_w, beta * d_l
        return detached(loss=loss, rewards_chosen=rw.mean(), rewards_rejected=rl.mean(),
                        reward_margin=(rw - rl).mean(), reward_accuracy=(rw > rl).float().mean(),
                        logps_chosen=S[:B].mean(), logps_rejected=S[B:].mean(),
                        mean_logp_chosen=lbar[:B].mean(), mean_logp_rejected=lbar[B:].mean(), entropy=entropy,
                        **extra)


@accepts_packed()
def dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, bias=None,
             temperature=1.0, ignore_index=-100, backend="auto"):
    """DPO: -log sigmoid(beta ((S_pi(yw) - S_ref(yw)) - (S_pi(yl) - S_ref(yl)))), mean over pairs.

    hidden [2B, T, H] and labels [2B, T]: chosen rows first, then rejected; ref_*_logps [B]: the
    reference model's sequence sums (precomputed). Metrics: rewards chosen/rejected/margin/accuracy,
    logps and mean per-token logps of chosen and rejected (the Δlog p signals), the policy's mean entropy over
    the response tokens.
    """
    _check_dpo(beta=beta, temperature=temperature)
    loss, S, lbar, d_w, d_l, B, _, entropy = _preference_loss(
        hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, beta=beta, bias=bias, temperature=temperature,
        ignore_index=ignore_index, backend=backend)
    return loss, _metrics(loss, beta, d_w, d_l, S, lbar, B, entropy)


@accepts_packed()
def cw_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, tau_c=0.5,
                l_floor="batch", bias=None, temperature=1.0, ignore_index=-100, backend="auto"):
    """Cooling-Weighted DPO: -log sigmoid(beta (Dw - w_c Dl)), w_c = sigmoid((lbar_pi(yl) - l_floor)/tau_c).

    `l_floor`: a number (e.g. the mean lbar of the negatives at the start of Stage 2, which the
    trainer computes for l_floor: auto) or "batch" (the mean lbar of this batch's rejected responses).
    Metrics: those of dpo_loss, plus cooling_weight_mean and cooling_weight_frac_below_0.1.
    """
    _check_cw_dpo(beta=beta, tau_c=tau_c, l_floor=l_floor, temperature=temperature)
    cooling = _Cooling(l_floor, tau_c)
    loss, S, lbar, d_w, d_l, B, w_c, entropy = _preference_loss(
        hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, beta=beta, cooling=cooling, bias=bias,
        temperature=temperature, ignore_index=ignore_index, backend=backend)
    floor = batch_floor(lbar[B:], l_floor)
    return loss, _metrics(loss, beta, d_w, d_l, S, lbar, B, entropy, cooling_weight_mean=w_c.mean(),
                          cooling_weight_frac_below_0_1=(w_c < 0.1).float().mean(), l_floor=torch.as_tensor(floor))


class DPOLoss(LossModule):
    fn = staticmethod(dpo_loss)
    check = staticmethod(_check_dpo)


class CWDPOLoss(LossModule):
    fn = staticmethod(cw_dpo_loss)
    check = staticmethod(_check_cw_dpo)
