"""The GRPO family (losses/grpo.py: loss_type, importance sampling against the sampler, KL estimators) against the
peers' published code, written here from TRL 1.16's GRPOTrainer._compute_loss and verl's core_algos.kl_penalty
(not from vlmfast's): loss and gradient within 1e-6 in fp64 on random inputs with ragged masks (a row with no
response token included), the ratio moved off 1 so every clip acts. DAPO's overlong punishment against verl's
reward manager."""

import math

import pytest
import torch

from vlmfast.losses import grpo_loss
from vlmfast.rewards import overlong_penalty

B, T, H, V = 5, 9, 16, 37
MAX_NEW = 12  # TRL's max_completion_length


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    for b, (start, stop) in enumerate([(2, 9), (4, 6), (1, 9), (3, 4), (0, 0)]):  # ragged; the last row empty
        y[b, :start] = -100
        y[b, stop:] = -100
    mask = y != -100
    with torch.no_grad():
        logp = torch.log_softmax(h @ W.T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    old = torch.where(mask, logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    ref = torch.where(mask, logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    sampler = torch.where(mask, old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return h, W, y, mask, old, ref, sampler, adv


def _trl_logps(h, W, y):
    return torch.log_softmax(h @ W.T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]


def trl_loss(h, W, y, mask, old, adv, *, loss_type, eps_low, eps_high, level="token", beta=0.0, ref=None,
             is_ratio=None):
    """TRL 1.16 GRPOTrainer._compute_loss, one process, no accumulation (num_items_in_batch = mask.sum())."""
    per_token_logps = _trl_logps(h, W, y)
    mask = mask.to(per_token_logps.dtype)
    advantages = adv[:, None]
    log_ratio = per_token_logps - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_NEW)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, cispo: num_items_in_batch


def _grads(fn, h, W):
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss = fn(h, W)
    return (loss.detach(), *torch.autograd.grad(loss, (h, W)))


def _close(ours, theirs):
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-6 * max(1.0, b.abs().max().item()), (a, b)


# vlmfast's loss_type -> TRL's (loss_type, importance_sampling_level); GSPO is TRL's sequence level with "grpo"
TRL = {"grpo": ("grpo", "token"), "dapo": ("dapo", "token"), "bnpo": ("bnpo", "token"),
       "dr_grpo": ("dr_grpo", "token"), "gspo": ("grpo", "sequence"), "cispo": ("cispo", "token")}


@pytest.mark.parametrize("loss_type", list(TRL))
@pytest.mark.parametrize("kl", [0.0, 0.05])
def test_each_loss_type_is_trls(batch, loss_type, kl):
    h, W, y, mask, old, ref, _, adv = batch
    name, level = TRL[loss_type]
    # CISPO's cap: TRL clamps the ratio at epsilon_high, vlmfast at 1 + clip_high
    eps_high = 1 + 0.28 if loss_type == "cispo" else 0.28
    theirs = _grads(lambda h, W: trl_loss(h, W, y, mask, old, adv, loss_type=name, eps_low=0.2, eps_high=eps_high,
                                          level=level, beta=kl, ref=ref), h, W)
    ours = _grads(lambda h, W: grpo_loss(h, W, y, old, adv, ref_logp=ref if kl else None, kl_coef=kl, clip_low=0.2,
                                         clip_high=0.28, loss_type=loss_type, max_new_tokens=MAX_NEW)[0], h, W)
    _close(ours, theirs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_importance_sampling_against_the_sampler_is_trls(batch, level, mode, on_policy):
    """TRL's vllm_importance_sampling_{mode}: exp(old - sampler) per token or summed per sequence, clamped to
    [min, max] or zeroed outside it, times the per-token loss before the KL term. On-policy (old = the pass's own
    log-probs) a sequence's weight reads the whole sequence: vlmfast runs it with a group per sequence."""
    h, W, y, mask, old, ref, sampler, adv = batch
    cap, cap_low = 1.6, 0.5
    maskf = mask.double()

    def theirs(h, W):
        logps = _trl_logps(h, W, y)
        o = logps.detach() if on_policy else old
        diff = (o - sampler) * maskf
        if level == "sequence":
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode == "truncate":
            ratio = torch.clamp(ratio, min=cap_low, max=cap)
        else:
            ratio = ratio.masked_fill((ratio < cap_low) | (ratio > cap), 0.0)
        return trl_loss(h, W, y, mask, o, adv, loss_type="dapo", eps_low=0.2, eps_high=0.2, beta=0.05, ref=ref,
                        is_ratio=ratio)

    ours = _grads(lambda h, W: grpo_loss(h, W, y, None if on_policy else old, adv, ref_logp=ref, kl_coef=0.05,
                                         sampler_logp=sampler, tis_cap=cap, is_cap_low=cap_low, is_level=level,
                                         is_mode=mode, loss_type="dapo")[0], h, W)
    _close(ours, _grads(theirs, h, W))
    m = grpo_loss(h, W, y, old, adv, sampler_logp=sampler, tis_cap=cap, is_cap_low=cap_low, is_level=level,
                  is_mode=mode)[1]
    assert 0 < m["is_clipped_frac"].item() < 1  # the caps act on some tokens, not all
    lo = cap_low if mode == "truncate" else 0.0  # masked weights are 0
    w_min, w_mean, w_max = (m[k].item() for k in ("is_weight_min", "is_weight_mean", "is_weight_max"))
    assert lo - 1e-6 <= w_min <= w_mean <= w_max <= cap + 1e-6
    assert m["sampler_mismatch_max"].item() == pytest.approx((old - sampler)[mask].abs().max().item(), rel=1e-6)


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl trainer/ppo/core_algos.py kl_penalty."""
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)  # low_var_kl, k3
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_are_verls(batch, estimator):
    h, W, y, mask, old, ref, _, adv = batch
    maskf = mask.double()

    def theirs(h, W):
        logps = _trl_logps(h, W, y)
        coef = torch.exp(logps - old)
        pg = -torch.min(coef * adv[:, None], torch.clamp(coef, 0.8, 1.2) * adv[:, None])
        per_token = pg + 0.1 * verl_kl_penalty(logps, ref, estimator)
        return (per_token * maskf).sum() / maskf.sum()

    ours = _grads(lambda h, W: grpo_loss(h, W, y, old, adv, ref_logp=ref, kl_coef=0.1, kl_estimator=estimator)[0],
                  h, W)
    _close(ours, _grads(theirs, h, W))


def test_gspo_ratio_and_clipping_are_per_sequence(batch):
    """GSPO's metrics count sequences: a sequence whose mean log-ratio leaves the clip range is clipped as one."""
    h, W, y, mask, old, _, _, adv = batch
    m = grpo_loss(h, W, y, old, adv, loss_type="gspo", clip_low=0.05, clip_high=0.05)[1]
    logp = _trl_logps(h, W, y)
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1))[mask.any(-1)]
    a = adv[mask.any(-1)]
    assert m["ratio_mean"].item() == pytest.approx(s.mean().item(), rel=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(((s > 1.05) & (a > 0)).double().mean().item(), rel=1e-6)
    assert m["clip_frac_low"].item() == pytest.approx(((s < 0.95) & (a < 0)).double().mean().item(), rel=1e-6)


def test_bad_options_are_named(batch):
    h, W, y, _, old, _, sampler, adv = batch
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(h, W, y, old, adv, loss_type="ppo")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        grpo_loss(h, W, y, old, adv, kl_estimator="k4")
    with pytest.raises(ValueError, match="dr_grpo.*needs max_new_tokens"):
        grpo_loss(h, W, y, old, adv, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type='gspo' sets the aggregation"):
        grpo_loss(h, W, y, old, adv, loss_type="gspo", aggregation="seq-mean-token-sum")
    with pytest.raises(ValueError, match="is_cap_low must be below tis_cap"):
        grpo_loss(h, W, y, old, adv, sampler_logp=sampler, tis_cap=1.0, is_cap_low=2.0)


def verl_overlong_reward(valid_response_length, max_resp_len, overlong_buffer_len, overlong_penalty_factor):
    """verl workers/reward_manager/dapo.py: the soft overlong punishment added to the score."""
    expected_len = max_resp_len - overlong_buffer_len
    exceed_len = valid_response_length - expected_len
    return min(-exceed_len / overlong_buffer_len * overlong_penalty_factor, 0)


def test_overlong_penalty_is_dapos():
    for length in range(0, 65):
        assert overlong_penalty(length, 64, 16, 0.5) == pytest.approx(verl_overlong_reward(length, 64, 16, 0.5))
    assert overlong_penalty(64, 64, 16, 1.0) == -1.0 and overlong_penalty(48, 64, 16, 1.0) == 0.0
    assert math.isclose(overlong_penalty(56, 64, 16, 1.0), -0.5)


@pytest.mark.parametrize("factor, want", [(None, -0.75), (0.5, -0.375), (0.0, 0.0)])
def test_a_stages_overlong_penalty_as_verl_applies_its_factor(factor, want):
    """The stage's overlong_penalty is verl's overlong_penalty_factor: default 1, and 0 punishes nothing (it was
    read as 'unset', the full punishment)."""
    from types import SimpleNamespace

    from vlmfast.stages.grpo_rollout import overlong_penalties

    s = SimpleNamespace(overlong_buffer=16, max_new_tokens=64, overlong_penalty=factor)
    got = overlong_penalties(s, [40, 60])
    assert got == pytest.approx([0.0, verl_overlong_reward(60, 64, 16, 1.0 if factor is None else factor)])
    assert got[1] == pytest.approx(want)
    assert overlong_penalties(SimpleNamespace(overlong_buffer=None), [60]) == [0.0]


def verl_grpo_kl_in_reward(scores, old_log_prob, ref_log_prob, response_mask, index, beta, norm_by_std=True,
                           kl_penalty="kl"):
    """verl: apply_kl_penalty (token_level_rewards = token_level_scores - beta * kld, the score on the last token;
    kld by algorithm.kl_penalty, default "kl"), then compute_grpo_outcome_advantage (scores =
    token_level_rewards.sum(-1), normalised within each uid)."""
    kld = verl_kl_penalty(old_log_prob, ref_log_prob, kl_penalty) * response_mask
    token_level_scores = torch.zeros_like(old_log_prob)
    last = response_mask.cumsum(-1).argmax(-1)
    token_level_scores[torch.arange(len(scores)), last] = scores
    token_level_rewards = token_level_scores - beta * kld
    s = token_level_rewards.sum(-1)
    out = torch.zeros_like(s)
    for uid in set(index):
        rows = [i for i, u in enumerate(index) if u == uid]
        g = s[rows]
        out[rows] = (g - g.mean()) / (torch.std(g) + 1e-6) if norm_by_std else g - g.mean()
    return s, out


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("estimator,verls", [(None, "kl"), ("k3", "low_var_kl"), ("k2", "mse")])
def test_kl_in_reward_is_verls(scale, estimator, verls):
    """GRPO's kl_in_reward: each sample's reward less kl_coef x its summed KL (rollout policy vs reference; k1 unless
    kl_estimator says otherwise, as verl's algorithm.kl_penalty defaults to "kl"), the group advantages from those
    rewards; against verl's apply_kl_penalty + compute_grpo_outcome_advantage (the group's sample std, torch.std's
    default, and eps 1e-6, as verl's)."""
    from types import SimpleNamespace

    from vlmfast.stages.grpo_rollout import _kl_in_reward

    g = torch.Generator().manual_seed(3)
    G, n = 4, 12
    labels = torch.randint(0, 50, (n, 7), generator=g)
    for i in range(n):
        labels[i, : 1 + i % 3] = -100
    mask = labels != -100
    old = torch.where(mask, -torch.rand(n, 7, generator=g) * 3, 0.0)
    ref = torch.where(mask, old + 0.3 * torch.randn(n, 7, generator=g), 0.0)
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    rows = [{"draw": 0, "place": i // G, "sample": i % G, "reward": float(rewards[i])} for i in range(n)]
    stage = SimpleNamespace(kl_estimator=estimator, kl_coef=0.2, group_size=G, advantage_scale=scale, loss_type=None)
    ro = {"rows": rows, "old": old, "ref": ref, "batch": {"labels": labels}}
    _kl_in_reward(SimpleNamespace(stage=stage), ro)
    want_r, want_adv = verl_grpo_kl_in_reward(rewards, old, ref, mask.float(), [i // G for i in range(n)], 0.2,
                                              norm_by_std=scale == "group", kl_penalty=verls)
    assert ro["rewards"].tolist() == pytest.approx(want_r.tolist(), abs=1e-5)
    assert ro["adv"].tolist() == pytest.approx(want_adv.tolist(), abs=1e-4)
    if estimator != "k1" and estimator is not None:
        assert ro["kl_penalty"].min() > 0  # k2 and k3 are never negative


def trl_advantages(rewards_per_func, weights, num_generations):
    """TRL 1.16 GRPOTrainer (sum_then_normalize, scale_rewards group): unscorable completions (every function None,
    NaN) out of the nan-aware baseline and std (utils.nanstd, Bessel-corrected), their advantage forced to 0."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    var = torch.nanmean((grouped - torch.nanmean(grouped, dim=1, keepdim=True)) ** 2, dim=1)
    count = (~torch.isnan(grouped)).sum(dim=1)
    std = torch.sqrt(var * count / (count - 1)).repeat_interleave(num_generations)
    adv = (rewards - mean) / (std + 1e-4)
    adv[unscorable] = 0.0
    return adv


def test_a_sample_no_reward_function_scored_is_out_of_its_groups_baseline_as_in_trl(monkeypatch):
    import vlmfast.reward_plugins as P
    from vlmfast.losses import group_advantages

    nan = float("nan")
    per_func = torch.tensor([[1.0, nan], [nan, nan], [0.0, 0.5], [1.0, 1.0],  # sample 1: no function scored it
                             [0.0, nan], [1.0, nan], [0.0, 0.0], [1.0, 0.0]])
    weights = torch.tensor([1.0, 0.5])
    want = trl_advantages(per_func, weights, 4)

    def column(j):
        return lambda completions, **_: [None if math.isnan(per_func[int(c), j]) else float(per_func[int(c), j])
                                         for c in completions]

    monkeypatch.setattr(P, "load", lambda path: column(int(path[-1])))
    fns = [P.RewardFn(path=f"m:f{j}", weight=float(weights[j])) for j in range(2)]
    total, _ = P.score_batch(fns, {"completions": [str(i) for i in range(8)]}, [str(i) for i in range(8)])
    assert math.isnan(total[1]) and not any(math.isnan(t) for i, t in enumerate(total) if i != 1)
    got = group_advantages(torch.tensor(total), 4, eps=1e-4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[1] == 0.0
