"""GRPO and its family: clipped policy gradient on G samples per prompt with group-normalised advantages.

    A_i   = (r_i - mean_group) / (std_group + 1e-6)       (scale: "group", "batch" or "none")
    rho   = exp(logp - logp_old)                          logp_old = detached logp when on-policy (None)
    pg    = the loss type's surrogate (below)
    is    = the sampler correction w(logp_old - logp_sampler) (sampler_is_weights; optional): pg *= is
    kl    = k1 | k2 | k3 of (logp, ref) (kl_estimate), if a reference is given
    loss  = agg(pg + kl_coef * kl - entropy_coef * H)

loss_type (TRL's names; None: the clipped surrogate with `aggregation`):
    grpo     -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)          agg seq-mean-token-mean
    dapo     the same                                                     agg token-mean (the global batch's)
    bnpo     the same                                                     agg token-mean (the rank's update)
    dr_grpo  the same (advantages not scaled by the std)                  agg seq-mean-token-sum-norm
    gspo     -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A),  s = exp(mean_t (logp - logp_old)) per sequence
                                                                          agg seq-mean-token-mean
    cispo    -sg(min(rho, 1 + eps_high)) A logp                           agg token-mean (the global batch's)
agg: "token-mean" (all response tokens), "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
(each sequence's sum over the longest a response may be, then the mean over sequences: Dr. GRPO's constant).
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

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SCALINGS = ("group", "batch", "none")
# loss_type -> (surrogate, aggregation); bnpo's token mean is the rank's own (the stage passes its update's count)
LOSS_TYPES = {"grpo": ("clip", "seq-mean-token-mean"), "dapo": ("clip", "token-mean"),
              "bnpo": ("clip", "token-mean"), "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
              "gspo": ("gspo", "seq-mean-token-mean"), "cispo": ("cispo", "token-mean")}
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6):
    """Advantages from rewards [B] laid out as B/G consecutive groups of G samples per prompt.

    scale="group": (r - group mean) / (group std + eps); "batch": divide by the batch std instead;
    "none": only subtract the group mean (Dr. GRPO). The std is the sample std (Bessel's n - 1), as TRL's `nanstd`
    and verl's `torch.std` take it: a group of 2 with rewards 1 and 0 gets +-0.707, not +-1. A NaN reward (no reward
    function scored the sample) is left out of its group's mean and std and gets advantage 0, as in TRL.
    """
    check_choice("scale", scale, SCALINGS)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not divisible into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.nanmean(1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(r, dim=1) + eps)
    elif scale == "batch":
        centred = centred / (_nanstd(r.view(1, -1), dim=1) + eps)
    # a NaN reward (a sample no reward function scored) is out of its group's mean and std, its advantage 0
    return torch.nan_to_num(centred.view(-1), nan=0.0)


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sample std (n - 1) of the non-NaN entries along `dim` (kept), 0 where fewer than 2 (no spread to scale
    by: those advantages are 0 or NaN anyway)."""
    count = (~x.isnan()).sum(dim, keepdim=True)
    var = ((x - x.nanmean(dim, keepdim=True)) ** 2).nansum(dim, keepdim=True) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.zeros_like(var))


def _check_grpo(*, clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, entropy_coef=0.0,
                aggregation="token-mean", temperature=1.0, tis_cap=None, loss_type=None, kl_estimator="k3",
                is_level="token", is_mode="truncate", is_cap_low=None, max_new_tokens=None, **_):
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
    if is_cap_low is not None:
        check_nonnegative("is_cap_low", is_cap_low)
        if tis_cap is not None and is_cap_low >= tis_cap:
            raise ValueError(f"is_cap_low must be below tis_cap ({tis_cap}), got {is_cap_low}")
    if loss_type is not None:
        check_choice("loss_type", loss_type, tuple(LOSS_TYPES))
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_choice("is_level", is_level, IS_LEVELS)
    check_choice("is_mode", is_mode, IS_MODES)
    if max_new_tokens is not None:
        check_positive("max_new_tokens", max_new_tokens)


def clipped_surrogate(ratio, adv, *, clip_low, clip_high, dual_clip=None):
    """PPO's clipped surrogate as GRPO, DAPO and Dr. GRPO use it (Schulman et al. 2017, eq. 7; dual clip: Ye et
    al. 2020): -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), and for A < 0 at most -A * dual_clip."""
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    return pg


def cispo_surrogate(logp, ratio, adv, *, clip_high):
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4): -sg(min(rho, 1 + eps_high)) A log pi, the IS weight clipped and
    stop-gradient: every token keeps its gradient, however far its ratio moved (TRL's `cispo`, whose epsilon_high is
    our 1 + clip_high)."""
    return -ratio.clamp(max=1 + clip_high).detach() * adv * logp


def gspo_ratio(logp_sum, old_sum, count):
    """GSPO's sequence ratio (Zheng et al. 2025, eq. 7): s = exp(mean_t (logp - logp_old)) over the sequence's
    response tokens, the gradient flowing to every token through the mean. Its surrogate is clipped_surrogate of s
    with the sequence's advantage, one per sequence."""
    return torch.exp((logp_sum - old_sum) / count.clamp(min=1))


def kl_estimate(logp, ref, estimator="k3"):
    """Schulman's estimators of KL(pi || pi_ref) from a sample of pi, per token (verl's kl_penalty "kl",
    "mse", "low_var_kl"): k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1
    (unbiased and >= 0; TRL's beta term)."""
    d = ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1


def sampler_is_weights(gap, *, mode="truncate", cap=None, cap_low=None):
    """The sampler/trainer mismatch correction (TRL's vllm_importance_sampling_*; Yao et al. 2025, "Your efficient
    RL framework secretly brings you off-policy RL training"): w = exp(gap), gap = logp_old - logp_sampler of a
    token, or its sum over the sequence (the same w on every token of it); "truncate" clamps w to [cap_low, cap],
    "mask" zeroes a w outside it (the token or the whole sequence drops out). A constant: no gradient."""
    w = torch.exp(gap.detach())
    lo = -math.inf if cap_low is None else cap_low
    hi = math.inf if cap is None else cap
    if mode == "truncate":
        return w.clamp(min=lo, max=hi)
    return w.masked_fill((w < lo) | (w > hi), 0.0)


def aggregation_weights(mask: torch.Tensor, aggregation: str, num_items_in_batch=None) -> torch.Tensor:
    """[B, T] weight of each token in the loss, Σ weight * per-token term: 1 / the token count ("token-mean"),
    1 / (B * the row's token count) ("seq-mean-token-mean"), 1 / B ("seq-mean-token-sum"), 1 / (B * L_max)
    ("seq-mean-token-sum-norm", L_max given as num_items_in_batch); 0 off the mask."""
    m = mask.float()
    if aggregation == "token-mean":
        return m / token_count(mask, num_items_in_batch)
    if aggregation == "seq-mean-token-mean":
        return m / (mask.shape[0] * m.sum(-1, keepdim=True).clamp(min=1))
    if aggregation == "seq-mean-token-sum-norm":
        if num_items_in_batch is None:
            raise ValueError("seq-mean-token-sum-norm divides by the longest a response may be: give it as "
                             "num_items_in_batch (max_new_tokens)")
        return m / (mask.shape[0] * num_items_in_batch)
    return m / mask.shape[0]


def aggregate(x: torch.Tensor, mask: torch.Tensor, aggregation: str, num_items_in_batch=None) -> torch.Tensor:
    return (x * aggregation_weights(mask, aggregation, num_items_in_batch)).sum()


def policy_terms(logp, entropy, adv, old, ref=None, sampler=None, *, row=None, rows=None, count=None,
                 surrogate="clip", clip_low, clip_high, dual_clip=None, kl_coef=0.0, kl_estimator="k3",
                 entropy_coef=0.0, is_level="token", is_mode="truncate", is_cap=None, is_cap_low=None) -> dict:
    """The per-token terms (module docstring) of response tokens, each [n]: "per_token" (what the loss
    aggregates), "pg", "ratio", and "kl", "sampler_gap", "is" where their inputs are given. old=None: on-policy,
    the update's own log-probs detached. The sequence-level quantities (GSPO's ratio, a sequence's IS weight) sum
    over each token's row (`row` [n], of `rows` rows, `count` [rows] response tokens each): given all tokens of
    those rows together (token_loss's groups)."""
    old = logp.detach() if old is None else old

    def per_row(x):  # each token's row sum of x
        return x.new_zeros(rows).index_add(0, row, x)[row]

    if surrogate == "gspo":
        ratio = gspo_ratio(per_row(logp), per_row(old), count[row])
        pg = clipped_surrogate(ratio, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    else:
        ratio = torch.exp(logp - old)
        pg = (cispo_surrogate(logp, ratio, adv, clip_high=clip_high) if surrogate == "cispo" else
              clipped_surrogate(ratio, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip))
    out = {"ratio": ratio}
    if sampler is not None:
        out["sampler_gap"] = gap = old.detach() - sampler
        if is_cap is not None or is_cap_low is not None:
            out["is"] = sampler_is_weights(per_row(gap) if is_level == "sequence" else gap, mode=is_mode,
                                           cap=is_cap, cap_low=is_cap_low)
            pg = pg * out["is"]  # before the KL term, as TRL
    out["pg"] = per_token = pg
    if ref is not None:
        out["kl"] = kl_estimate(logp, ref, kl_estimator)
        if kl_coef > 0:
            per_token = per_token + kl_coef * out["kl"]
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    out["per_token"] = per_token
    return out


@accepts_packed("old_logp", "advantages", "ref_logp", "sampler_logp")
def grpo_loss(hidden, weight, labels, old_logp, advantages, *, ref_logp=None, clip_low=0.2, clip_high=0.2,
              dual_clip=None, kl_coef=0.0, entropy_coef=0.0, aggregation="token-mean", bias=None,
              temperature=1.0, ignore_index=-100, backend="auto", num_items_in_batch=None, sampler_logp=None,
              tis_cap=None, loss_type=None, kl_estimator="k3", is_level="token", is_mode="truncate",
              is_cap_low=None, max_new_tokens=None):
    """The clipped policy-gradient loss of GRPO and its family (module docstring) on sampled responses.

    hidden [B, T, H], weight [V, H], labels [B, T] (the sampled tokens; -100 elsewhere),
    old_logp [B, T] (log-probs under the sampling policy, same temperature) or None: on-policy, the
    update's own log-probs detached (one update per rollout: no recompute pass), advantages [B] or
    [B, T], ref_logp [B, T] for the KL penalty (needed when kl_coef > 0; `kl_estimator` k1, k2 or k3).
    loss_type: grpo, dapo, bnpo, dr_grpo, gspo or cispo (it sets the aggregation; dr_grpo needs
    max_new_tokens, the longest a response may be), or None: the clipped surrogate with `aggregation`.
    sampler_logp [B, T]: the generation engine's log-probs of the sampled tokens; adds the metric
    sampler_mismatch = mean |logp_old - logp_sampler| and, with tis_cap (and/or is_cap_low), weighs each token's
    policy gradient by sampler_is_weights (is_level token or sequence, is_mode truncate or mask; TRL's and verl's
    correction for a sampler that is not exactly the trainer; before the KL term, as TRL).
    num_items_in_batch (token-mean only): the response-token count the summed loss divides by when this
    call holds part of a larger batch (TRL's "dapo" normalisation: all ranks' tokens / number of ranks,
    since DeepSpeed averages the ranks' gradients).

    One pass (token_loss) either way: a token-level surrogate's gradient is known from each token's own log-prob;
    GSPO's sequence ratio (and a sequence-level IS weight on-policy, where logp_old is the pass's own) reads every
    token of its sequence, so those run with a group per sequence (token_loss's groups, as DPO's pairs).
    Metrics: entropy, kl, clip_frac_low, clip_frac_high, ratio_mean/min/max (GSPO: of the sequences' ratios),
    pg_loss; with sampler_logp also sampler_mismatch, is_weight_mean and is_clipped_frac (tokens whose weight the
    cap changed).
    """
    if loss_type is not None and aggregation not in ("token-mean", LOSS_TYPES.get(loss_type, (0, aggregation))[1]):
        raise ValueError(f"loss_type={loss_type!r} sets the aggregation: give it or aggregation={aggregation!r}")
    surrogate, type_aggregation = LOSS_TYPES.get(loss_type, ("clip", aggregation))
    _check_grpo(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                entropy_coef=entropy_coef, aggregation=type_aggregation, temperature=temperature, tis_cap=tis_cap,
                loss_type=loss_type, kl_estimator=kl_estimator, is_level=is_level, is_mode=is_mode,
                is_cap_low=is_cap_low, max_new_tokens=max_new_tokens)
    aggregation = type_aggregation
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
    if aggregation == "seq-mean-token-sum-norm":
        if max_new_tokens is None:
            raise ValueError("loss_type='dr_grpo' (seq-mean-token-sum-norm) needs max_new_tokens, the constant each "
                             "sequence's sum divides by")
        num_items_in_batch = max_new_tokens
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (per-token log-probs of the reference policy)")
    if ref_logp is not None:
        check_shape("ref_logp", ref_logp, (B, T), "per-token log-probs of the reference policy")
    if sampler_logp is not None:
        check_shape("sampler_logp", sampler_logp, (B, T), "per-token log-probs of the generation engine")
    elif tis_cap is not None or is_cap_low is not None:
        raise ValueError("tis_cap needs sampler_logp (the generation engine's per-token log-probs)")

    mask = response_mask(labels, ignore_index)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    # per-token constants, flat like the target: the one-pass loss reads them at its tokens' positions
    consts = {k: None if v is None else v.detach().float().expand(B, T).reshape(-1)
              for k, v in (("adv", adv), ("old", old_logp), ("ref", ref_logp), ("sampler", sampler_logp))}
    weights = aggregation_weights(mask, aggregation, num_items_in_batch).reshape(-1)
    count = mask.sum(-1)
    hp = dict(surrogate=surrogate, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
              kl_estimator=kl_estimator, entropy_coef=entropy_coef, is_level=is_level, is_mode=is_mode,
              is_cap=tis_cap, is_cap_low=is_cap_low)
    # whole sequences at once: GSPO's ratio, or a sequence's IS weight from the pass's own log-probs
    by_sequence = surrogate == "gspo" or (is_level == "sequence" and sampler_logp is not None
                                          and (tis_cap is not None or is_cap_low is not None))

    def terms(logp, entropy, index):
        return policy_terms(logp, entropy, **{k: None if v is None else v[index] for k, v in consts.items()},
                            row=index // T, rows=B, count=count, **hp)

    def per_token(s, index):  # every weight is a constant per token: one pass (token_loss)
        losses = terms(s["logp"], s["entropy"], index)["per_token"] * weights[index]
        return losses.new_zeros(B).index_add(0, index // T, losses) if by_sequence else losses

    groups = torch.arange(B, device=labels.device)[:, None].expand(B, T) if by_sequence else None
    loss, r = token_loss(hidden, weight, labels, per_token, groups=groups, bias=bias, temperature=temperature,
                         ignore_index=ignore_index, backend=backend)

    with torch.no_grad():  # metrics: the same terms over every response token, laid out [B, T] (0 elsewhere)
        index = mask.reshape(-1).nonzero().squeeze(1)
        t = terms(r.logp.reshape(-1)[index], r.entropy.reshape(-1)[index], index)

        def grid(x):
            return torch.zeros(B * T, device=x.device).index_copy(0, index, x.float()).view(B, T)

        ratio, adv_bt = grid(t["ratio"]), consts["adv"].view(B, T)
        # GSPO's ratio is one per sequence: its metrics count sequences (TRL's), the others tokens
        unit = mask & (torch.arange(T, device=mask.device) == mask.float().argmax(-1, keepdim=True)) \
            if surrogate == "gspo" else mask
        n = unit.sum().clamp(min=1)
        extra = {}
        if "sampler_gap" in t:  # TRL's sampling/sampling_logp_difference and importance_sampling_ratio
            gap = grid(t["sampler_gap"])
            extra["sampler_mismatch"] = masked_mean(gap.abs(), mask)
            extra["sampler_mismatch_max"] = _extreme(gap.abs(), mask, "max")
            if "is" in t:
                w = grid(t["is"])
                raw = torch.exp(gap if is_level == "token" else (gap * mask).sum(-1, keepdim=True).expand(B, T))
                extra["is_weight_mean"] = masked_mean(w, mask)
                extra["is_weight_min"], extra["is_weight_max"] = _extreme(w, mask, "min"), _extreme(w, mask, "max")
                extra["is_clipped_frac"] = masked_mean((w != raw).float(), mask)
        kl = masked_mean(grid(t["kl"]), mask) if "kl" in t else torch.zeros(())
        if surrogate == "cispo":  # TRL's cispo_clip_ratio: a positive advantage whose IS weight the cap held
            low = torch.zeros(())
            high = (mask & (adv_bt > 0) & (ratio > 1 + clip_high)).sum() / n
        else:
            low = (unit & (adv_bt < 0) & (ratio < 1 - clip_low)).sum() / n
            high = (unit & (adv_bt > 0) & (ratio > 1 + clip_high)).sum() / n
        r_min, r_max = _extreme(ratio, mask, "min", 1.0), _extreme(ratio, mask, "max", 1.0)
        ratio_mean = masked_mean(ratio, unit)
    norm = max_new_tokens if aggregation == "seq-mean-token-sum-norm" else None  # pg_loss: this call's own mean
    return loss, detached(loss=loss, pg_loss=aggregate(grid(t["pg"]), mask, aggregation, norm),
                          entropy=masked_mean(r.entropy, mask), kl=kl, clip_frac_low=low, clip_frac_high=high,
                          ratio_mean=ratio_mean, ratio_min=r_min, ratio_max=r_max, **extra)


def _extreme(x: torch.Tensor, mask: torch.Tensor, which: str, empty: float = 0.0) -> torch.Tensor:
    """The min or max of x over the counted tokens (`empty` when there is none)."""
    fill = math.inf if which == "min" else -math.inf
    v = torch.where(mask, x, torch.full_like(x, fill))
    v = v.min() if which == "min" else v.max()
    return torch.where(torch.isinf(v), torch.full_like(v, empty), v)


class GRPOLoss(LossModule):
    fn = staticmethod(grpo_loss)
    check = staticmethod(_check_grpo)
