"""GRPO: clipped policy gradient on G samples per prompt with group-normalised advantages.

    A_i   = (r_i - mean_group) / (std_group + 1e-6)       (scale: "group", "batch" or "none")
    rho   = exp(logp - logp_old)                          logp_old = detached logp when on-policy (None)
    pg    = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
            dual clip (A < 0): min(pg, -A * dual_clip)
    tis   = min(exp(logp_old - logp_sampler), tis_cap)     truncated importance sampling (optional): pg *= tis
    k3    = exp(ref - logp) - (ref - logp) - 1                KL to a reference, if given
    loss  = agg(pg + kl_coef * k3 - entropy_coef * H)
    agg   = "token-mean" (all response tokens), "seq-mean-token-mean", "seq-mean-token-sum"
"""

from __future__ import annotations

import math

import torch

from ..ops import token_loss
from ._common import (
    LossModule,
    accepts_packed,
    check_batch_time,
    check_choice,
    check_nonnegative,
    check_num_items,
    check_positive,
    check_shape,
    detached,
    masked_mean,
    response_mask,
    token_count,
)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
SCALINGS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6):
    """Advantages from rewards [B] laid out as B/G consecutive groups of G samples per prompt.

    scale="group": (r - group mean) / (group std + eps); "batch": divide by the batch std instead;
    "none": only subtract the group mean (Dr. GRPO).
    """
    check_choice("scale", scale, SCALINGS)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not divisible into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":
        std = r.std(1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (r.std(unbiased=False) + eps)
    return centred.view(-1)


def _check_grpo(*, clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, entropy_coef=0.0,
                aggregation="token-mean", temperature=1.0, tis_cap=None, **_):
    check_nonnegative("clip_low", clip_low)
    check_nonnegative("clip_high", clip_high)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 (the ratio's lower bound is 1 - clip_low), got {clip_low}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip!r}")
    check_nonnegative("kl_coef", kl_coef)
    check_nonnegative("entropy_coef", entropy_coef)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_positive("temperature", temperature)
    if tis_cap is not None:
        check_positive("tis_cap", tis_cap)


def aggregation_weights(mask: torch.Tensor, aggregation: str, num_items_in_batch=None) -> torch.Tensor:
    """[B, T] weight of each token in the loss, Σ weight * per-token term: 1 / the token count ("token-mean"),
    1 / (B * the row's token count) ("seq-mean-token-mean"), 1 / B ("seq-mean-token-sum"); 0 off the mask."""
    m = mask.float()
    if aggregation == "token-mean":
        return m / token_count(mask, num_items_in_batch)
    if aggregation == "seq-mean-token-mean":
        return m / (mask.shape[0] * m.sum(-1, keepdim=True).clamp(min=1))
    return m / mask.shape[0]


def aggregate(x: torch.Tensor, mask: torch.Tensor, aggregation: str, num_items_in_batch=None) -> torch.Tensor:
    return (x * aggregation_weights(mask, aggregation, num_items_in_batch)).sum()


def policy_terms(logp, entropy, adv, old, ref=None, sampler=None, *, clip_low, clip_high, dual_clip=None,
                 tis_cap=None, kl_coef=0.0, entropy_coef=0.0) -> dict:
    """GRPO's per-token terms (module docstring) of response tokens, every tensor of one shape: "per_token" (what
    the loss aggregates), "pg", "ratio", and "k3", "sampler_gap", "tis" where their inputs are given. old=None:
    on-policy, the update's own log-probs detached."""
    old = logp.detach() if old is None else old
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    out = {"ratio": ratio}
    if sampler is not None:
        out["sampler_gap"] = old.detach() - sampler
        if tis_cap is not None:
            out["tis"] = torch.exp(out["sampler_gap"]).clamp(max=tis_cap)
            pg = pg * out["tis"]  # before the KL term, as TRL
    out["pg"] = per_token = pg
    if ref is not None:
        d = ref - logp
        out["k3"] = torch.exp(d) - d - 1
        if kl_coef > 0:
            per_token = per_token + kl_coef * out["k3"]
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    out["per_token"] = per_token
    return out


@accepts_packed("old_logp", "advantages", "ref_logp", "sampler_logp")
def grpo_loss(hidden, weight, labels, old_logp, advantages, *, ref_logp=None, clip_low=0.2, clip_high=0.2,
              dual_clip=None, kl_coef=0.0, entropy_coef=0.0, aggregation="token-mean", bias=None,
              temperature=1.0, ignore_index=-100, backend="auto", num_items_in_batch=None, sampler_logp=None,
              tis_cap=None):
    """Clipped policy-gradient loss of GRPO on sampled responses.

    hidden [B, T, H], weight [V, H], labels [B, T] (the sampled tokens; -100 elsewhere),
    old_logp [B, T] (log-probs under the sampling policy, same temperature) or None: on-policy, the
    update's own log-probs detached (one update per rollout: no recompute pass), advantages [B] or
    [B, T], ref_logp [B, T] for the k3 KL penalty (needed when kl_coef > 0).
    sampler_logp [B, T]: the generation engine's log-probs of the sampled tokens; adds the metric
    sampler_mismatch = mean |logp_old - logp_sampler| and, with tis_cap, weighs each token's policy
    gradient by min(exp(logp_old - logp_sampler), tis_cap) (truncated importance sampling, TRL's and
    verl's correction for a sampler that is not exactly the trainer; before the KL term, as TRL).
    num_items_in_batch (token-mean only): the response-token count the summed loss divides by when this
    call holds part of a larger batch (TRL's "dapo" normalisation: all ranks' tokens / number of ranks,
    since DeepSpeed averages the ranks' gradients).
    Metrics: entropy, kl, clip_frac_low, clip_frac_high, ratio_mean/min/max, pg_loss.
    """
    _check_grpo(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                entropy_coef=entropy_coef, aggregation=aggregation, temperature=temperature, tis_cap=tis_cap)
    B, T = check_batch_time(hidden, labels)
    if old_logp is not None:
        check_shape("old_logp", old_logp, (B, T), "per-token log-probs of the sampling policy")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be [B] = ({B},) or [B, T] = ({B}, {T}), got {got}")
    check_num_items(num_items_in_batch)
    if num_items_in_batch is not None and aggregation != "token-mean":
        raise ValueError(f"num_items_in_batch applies to aggregation='token-mean', not {aggregation!r} "
                         "(a per-sequence mean needs only equal sequence counts per part)")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (per-token log-probs of the reference policy)")
    if ref_logp is not None:
        check_shape("ref_logp", ref_logp, (B, T), "per-token log-probs of the reference policy")
    if sampler_logp is not None:
        check_shape("sampler_logp", sampler_logp, (B, T), "per-token log-probs of the generation engine")
    elif tis_cap is not None:
        raise ValueError("tis_cap needs sampler_logp (the generation engine's per-token log-probs)")

    mask = response_mask(labels, ignore_index)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    # per-token constants, flat like the target: the one-pass loss reads them at its tokens' positions
    consts = {k: None if v is None else v.detach().float().expand(B, T).reshape(-1)
              for k, v in (("adv", adv), ("old", old_logp), ("ref", ref_logp), ("sampler", sampler_logp))}
    weights = aggregation_weights(mask, aggregation, num_items_in_batch).reshape(-1)
    hp = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, tis_cap=tis_cap, kl_coef=kl_coef,
              entropy_coef=entropy_coef)

    def terms(logp, entropy, index):
        return policy_terms(logp, entropy, **{k: None if v is None else v[index] for k, v in consts.items()}, **hp)

    def per_token(s, index):  # every weight is a constant per token: one pass (token_loss)
        return terms(s["logp"], s["entropy"], index)["per_token"] * weights[index]

    loss, r = token_loss(hidden, weight, labels, per_token, bias=bias, temperature=temperature,
                         ignore_index=ignore_index, backend=backend)

    with torch.no_grad():  # metrics: the same terms over every response token, laid out [B, T] (0 elsewhere)
        index = mask.reshape(-1).nonzero().squeeze(1)
        t = terms(r.logp.reshape(-1)[index], r.entropy.reshape(-1)[index], index)

        def grid(x):
            return torch.zeros(B * T, device=x.device).index_copy(0, index, x.float()).view(B, T)

        ratio, adv_bt = grid(t["ratio"]), consts["adv"].view(B, T)
        n = mask.sum().clamp(min=1)
        extra = {}
        if "sampler_gap" in t:
            gap = grid(t["sampler_gap"])
            extra["sampler_mismatch"] = masked_mean(gap.abs(), mask)
            if "tis" in t:
                extra["tis_weight_mean"] = masked_mean(grid(t["tis"]), mask)
                extra["tis_truncated_frac"] = masked_mean((gap > math.log(tis_cap)).float(), mask)
        kl = masked_mean(grid(t["k3"]), mask) if "k3" in t else torch.zeros(())
        low = (mask & (adv_bt < 0) & (ratio < 1 - clip_low)).sum() / n
        high = (mask & (adv_bt > 0) & (ratio > 1 + clip_high)).sum() / n
        big = torch.finfo(ratio.dtype).max
        r_min = torch.where(mask, ratio, torch.full_like(ratio, big)).min()
        r_max = torch.where(mask, ratio, torch.full_like(ratio, -big)).max()
    return loss, detached(loss=loss, pg_loss=aggregate(grid(t["pg"]), mask, aggregation),
                          entropy=masked_mean(r.entropy, mask), kl=kl, clip_frac_low=low, clip_frac_high=high,
                          ratio_mean=masked_mean(ratio, mask), ratio_min=r_min, ratio_max=r_max, **extra)


class GRPOLoss(LossModule):
    fn = staticmethod(grpo_loss)
    check = staticmethod(_check_grpo)
