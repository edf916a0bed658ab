"""The GRPO step: each update on its minibatch of the current rollout batch (grpo_rollout.py: sampled, scored and kept
with the sampler's, old and reference log-probs across its updates, and in checkpoints), in micro-batches; the
recipe keys of the GRPO family."""

from __future__ import annotations

import torch

from ..data.collate import batch_rows
from ..losses import grpo_loss
from ..losses.grpo import LOSS_TYPES, SCALINGS, _check_grpo
from ..reward_plugins import check_spec
from .base import Stage, check_loss
from .context import StageContext, _device, _policy_loss, in_micro_batches, on_device, rank_share_of_tokens
from .grpo_rollout import (  # noqa: F401 (update_micro_slices: the trainer's tests read it here)
    _rollout,
    advantage_scale,
    restore_rollout,
    rollout_state,
    steps_per_rollout,
    update_micro_slices,
    update_rows,
    update_rows_of,
)


def grpo_step(ctx: StageContext, step: int):
    """One optimizer update on the step's minibatch of the current rollout batch; a new rollout every
    updates_per_rollout x epochs_per_rollout steps (each pass over the batch takes its minibatches in order, as
    TRL's num_iterations and verl's ppo_epochs do; later updates see ratios != 1: that is where clipping acts). The
    rollout happens here; the update's forwards happen as the returned micro-batches are iterated."""
    s = ctx.stage
    index, k = divmod(step, steps_per_rollout(s))
    part = k % s.updates_per_rollout
    ro = ctx.extra.get("rollout")
    if ro is None or ro["index"] != index:
        ro = ctx.extra["rollout"] = _rollout(ctx, index)
    rows = update_rows(ctx)
    return _grpo_update(ctx, ro, slice(part * rows, (part + 1) * rows), ro["micro"][part])


# token means combine weighted by tokens; extremes by min / max
_TOKEN_MEAN_METRICS = ("entropy", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "sampler_mismatch",
                       "is_weight_mean", "is_clipped_frac")


def _grpo_update(ctx: StageContext, ro: dict, update: slice, micro: list[slice]):
    """The update on rows `update` of the rollout batch, in its micro-batches `micro`: yields each
    micro-batch's share of the update's loss (the token mean divides by the whole update's tokens; the
    per-sequence means weigh a micro-batch by its rows, so uneven ones add up too), with the update's metrics on
    the last one."""
    s = ctx.stage
    whole = batch_rows(ro["batch"], update)
    rows = whole["labels"].shape[0]
    aggregation = aggregation_of(s)
    n = None  # a per-sequence mean: each micro-batch weighs by its rows
    if aggregation == "token-mean":  # the global batch's tokens (bnpo: the rank's own)
        n = (rank_share_of_tokens(whole["labels"], _device(ctx)) if s.loss_type != "bnpo" else
             (whole["labels"] != -100).sum().float().clamp(min=1).to(_device(ctx)))

    def forward(sl):
        loss, m, labels = _grpo_forward(ctx, ro, sl, n)
        if n is None:  # a per-sequence mean over this micro-batch: its share of the update's mean
            loss = loss * (labels.shape[0] / rows)
        return loss, m, {"tokens": int((labels != -100).sum()), "rows": labels.shape[0]}

    # token means combine weighted by tokens (in the micro-batches and over the ranks), the rest by rows
    token_means = _TOKEN_MEAN_METRICS + (("pg_loss",) if aggregation == "token-mean" else ())
    for share, step in in_micro_batches(ctx, micro, forward, dict.fromkeys(token_means, "tokens"),
                                        rank_tokens=int(whole["attention_mask"].sum())):
        if step is not None:
            step.update(_rollout_metrics(ro, update, whole))
            ctx.extra["metric_weights"].update({  # each reward function's mean: over the samples it scored
                f"reward/{k}": sum(r["parts"][k] is not None for r in ro["rows"][update])
                for k in ro["rows"][0]["parts"]})
        yield share, step


def _grpo_forward(ctx: StageContext, ro: dict, sl: slice, n):
    """GRPO's loss on rows `sl` of the rollout batch (token means over n tokens when given): (loss, metrics,
    the rows' labels on the host, to count without a device sync)."""
    s = ctx.stage
    host = batch_rows(ro["batch"], sl)  # the rollout's tensors live on the host
    b = on_device(ctx, host)
    labels = b["labels"]
    per_sample = on_device(ctx, {k: ro[k][sl] for k in ("ref", "old", "adv", "sampler") if ro[k] is not None})
    # old None: on-policy, the update's own log-probs

    def loss_fn(h, w):
        return grpo_loss(h, w, labels, per_sample.get("old"), per_sample["adv"], ref_logp=per_sample.get("ref"),
                         num_items_in_batch=n, sampler_logp=per_sample["sampler"], **loss_options(s))

    loss, m = _policy_loss(ctx, b, loss_fn)
    return loss, m, host["labels"]


def aggregation_of(s) -> str:
    """The stage's aggregation: its loss_type's, else its own."""
    return LOSS_TYPES.get(s.loss_type, (None, s.aggregation))[1]


def loss_options(s) -> dict:
    """grpo_loss's hyperparameters from the stage (defaults resolved)."""
    kl_coef = 0.0 if s.kl_in_reward else s.kl_coef  # in the reward instead (kl_in_reward): not in the loss
    return dict(clip_low=s.clip_low, clip_high=s.clip_high, dual_clip=s.dual_clip, kl_coef=kl_coef,
                entropy_coef=s.entropy_coef, aggregation=aggregation_of(s), temperature=s.temperature,
                tis_cap=s.tis_cap, loss_type=s.loss_type, kl_estimator=s.kl_estimator or "k3",
                is_level=s.is_level or "token", is_mode=s.is_mode or "truncate", is_cap_low=s.is_cap_low,
                max_new_tokens=s.max_new_tokens)


def _rollout_metrics(ro: dict, update: slice, whole: dict) -> dict:
    """The update's metrics from its rows of the rollout: rewards (each reward function's mean over the samples it
    scored), accuracy, format, truncation and penalties, dynamic sampling's rounds, response lengths."""
    scores = ro["scores"][update]
    m = {"reward": ro["rewards"][update].nanmean()}  # over the scored samples
    for name in ro["rows"][0]["parts"]:
        got = [r["parts"][name] for r in ro["rows"][update] if r["parts"][name] is not None]
        m[f"reward/{name}"] = torch.tensor(sum(got) / max(len(got), 1))
    m.update({k: torch.tensor(v) for k, v in ro["info"].items()})  # dynamic sampling's rounds and filtered share
    m["truncated"] = ro["truncated"][update].mean()  # completions that ran out of max_new_tokens
    m["overlong_penalty"] = ro["penalty"][update].mean()  # DAPO's soft punishment, in the reward above
    if "kl_penalty" in ro:  # kl_in_reward: the KL taken from the reward above
        m["kl_penalty"] = ro["kl_penalty"][update].mean()
    m["accuracy"] = torch.tensor(sum(x.accuracy for x in scores) / len(scores))
    m["format"] = torch.tensor(sum(x.format for x in scores) / len(scores))
    m["response_tokens"] = (whole["labels"] != -100).sum(1).float().mean()
    return m


class GRPO(Stage):
    types = ("grpo",)
    step = staticmethod(grpo_step)
    own_keys = {"tis_cap": "importance sampling weights", "is_cap_low": "importance sampling weights",
                "is_level": "importance sampling weights", "is_mode": "importance sampling weights",
                "loss_type": "GRPO loss types", "kl_estimator": "KL estimators",
                "mask_truncated": "overlong filtering", "overlong_buffer": "overlong punishments",
                "overlong_penalty": "overlong punishments", "advantage_scale": "advantage scalings",
                "rewards": "reward functions", "reward_workers": "reward functions",
                "dynamic_sampling": "dynamic sampling", "max_sampling_rounds": "dynamic sampling",
                "kl_in_reward": "a KL penalty in the reward", "epochs_per_rollout": "passes over a rollout",
                "group_size": "groups of samples", "updates_per_rollout": "updates per rollout",
                "clip_low": "ratio clips", "clip_high": "ratio clips", "dual_clip": "ratio clips",
                "kl_coef": "KL penalties", "entropy_coef": "entropy bonuses", "aggregation": "loss aggregations"}

    def needs_reference(self, s):
        return s.kl_coef > 0  # the KL penalty to pi_ref

    def rows_per_rank(self, s, world_size):
        return update_rows_of(s, world_size)  # an update: its prompts x group_size samples

    def prompts_per_step(self, s):
        return s.batch_size * s.updates_per_rollout  # a rollout batch serves updates_per_rollout steps

    def rollout_rows(self, s, world_size):
        return s.batch_size * s.updates_per_rollout // world_size * s.group_size

    def check(self, s, key, bad):
        if s.group_size < 2:
            bad(f"{key}.group_size", f"GRPO needs >= 2 samples per prompt, got {s.group_size}")
        if s.loss_type is not None and s.aggregation != "token-mean":
            bad(f"{key}.aggregation", f"loss_type {s.loss_type} sets the aggregation: give one of them")
        check_loss(bad, key, _check_grpo, **{k: v for k, v in loss_options(s).items() if k != "max_new_tokens"})
        if advantage_scale(s) not in SCALINGS:
            bad(f"{key}.advantage_scale", f"must be one of {SCALINGS}, got {s.advantage_scale!r}")
        if s.overlong_buffer is not None and not 0 < s.overlong_buffer <= s.max_new_tokens:
            bad(f"{key}.overlong_buffer", f"must be in [1, max_new_tokens={s.max_new_tokens}], got {s.overlong_buffer}")
        if s.overlong_penalty is not None and s.overlong_buffer is None:
            bad(f"{key}.overlong_penalty", "needs overlong_buffer (the tokens over which the penalty grows)")
        check_spec(s.rewards, bad, f"{key}.rewards")
        if s.kl_in_reward and s.kl_coef <= 0:
            bad(f"{key}.kl_in_reward", "needs kl_coef > 0 (the KL's weight in the reward)")
        if s.max_sampling_rounds is not None and (not s.dynamic_sampling or s.max_sampling_rounds < 1):
            bad(f"{key}.max_sampling_rounds", "must be >= 1, with dynamic_sampling: true")
        if s.reward_workers is not None and s.reward_workers < 0:
            bad(f"{key}.reward_workers", f"must be >= 0, got {s.reward_workers}")
        if s.epochs_per_rollout is not None and s.epochs_per_rollout < 1:
            bad(f"{key}.epochs_per_rollout", f"must be >= 1, got {s.epochs_per_rollout}")
        if s.overlong_penalty is not None and s.overlong_penalty < 0:
            bad(f"{key}.overlong_penalty", f"must be >= 0, got {s.overlong_penalty}")

    def open(self, ctx, saved):
        ctx.extra["drawn"] = (saved or {}).get("drawn", 0)  # dynamic sampling's prompts drawn so far

    def state(self, ctx):
        return {"drawn": ctx.extra.get("drawn", 0)}

    def rank_state(self, ctx):
        return rollout_state(ctx)

    def restore_rank_state(self, ctx, saved):
        if saved is not None:  # killed inside a rollout batch: continue it, do not redraw it
            restore_rollout(ctx, saved)


STAGE = GRPO()
