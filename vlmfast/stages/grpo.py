"""The GRPO step: a rollout batch sampled, scored and kept (with the sampler's, old and reference log-probs) across
its updates, each update in micro-batches; the rollout in progress is part of a checkpoint."""

from __future__ import annotations

import dataclasses

import torch

from ..data.collate import collate_token_responses
from ..losses import group_advantages, grpo_loss
from ..losses.grpo import LOSS_TYPES, SCALINGS, _check_grpo, kl_estimate
from ..models import head_token_stats, trunk_hidden
from ..ranks import gathered_dict, gathered_rows
from ..reward_plugins import check_spec, reward_fns, score_batch
from ..rewards import Reward, overlong_penalty, score
from .base import Stage, check_loss
from .context import (
    StageContext,
    _device,
    _policy_loss,
    _rows,
    _sample,
    balanced_over_ranks,
    batch_examples,
    combined_metrics,
    examples_at,
    micro_slices,
    prompt_tokens,
    rank_share_of_tokens,
    world,
)
from .dynamic_sampling import filled_rollout


def update_rows(ctx: StageContext) -> int:
    """Sequences of one GRPO update on this rank."""
    return STAGE.rows_per_rank(ctx.stage, world()[1])


def update_micro_slices(ctx: StageContext, batch: dict, update: slice) -> list[slice]:
    """Rows `update` of a rollout batch in micro-batches (context.micro_slices). The old and reference log-prob
    passes run the same slices, so no recompute is larger than an update's forward and the first update's ratio
    is exactly 1."""
    local = micro_slices(ctx, batch["attention_mask"][update].sum(1).tolist())
    return [slice(update.start + m.start, update.start + m.stop) for m in local]


def rollout_micro_slices(ctx: StageContext, batch: dict) -> list[list[slice]]:
    """Each update's micro-batches over a rollout batch, decided once per rollout: the old and reference passes and
    every update read the same list (with a token budget, one all-reduce per update, not one per use)."""
    rows = update_rows(ctx)
    updates = range(ctx.stage.updates_per_rollout)
    return [update_micro_slices(ctx, batch, slice(u * rows, (u + 1) * rows)) for u in updates]


def _sampler_logp_grid(rows: list[dict], batch) -> torch.Tensor:
    """Sampler log-probs laid out like batch['labels'] (0 elsewhere)."""
    grid = torch.zeros(batch["labels"].shape)
    for b, row in enumerate(rows):
        start = int(batch["prompt_lengths"][b]) - 1
        grid[b, start : start + len(row["token_ids"])] = torch.tensor(row["logprobs"])
    return grid


@torch.no_grad()
def _rollout(ctx: StageContext, index: int) -> dict:
    """One rollout batch: batch_size * updates_per_rollout prompts x group_size samples (groups with differing
    rewards only, more prompts sampled until the batch is full, with dynamic_sampling), rewards, group advantages,
    the sampler's log-probs, and the old log-probs of the policy that sampled them: recomputed by the trainer when
    several updates share the rollout (so the ratio is exactly 1 at the first update); with one update per rollout
    none (the update's own log-probs, detached, are exactly those: no extra pass). Each update's samples are then
    balanced across the ranks by length (balance_batch)."""
    s = ctx.stage
    if s.dynamic_sampling:
        rows, info = filled_rollout(ctx, lambda exs, positions, draw: _sampled_rows(ctx, exs, positions, draw),
                                    s.max_sampling_rounds or 4)
    else:
        exs, positions = _rollout_examples(ctx, index)
        rows, info = _sampled_rows(ctx, exs, positions, index), {}
    _advantages(ctx, rows)
    if s.balance_batch is not False and world()[1] > 1:
        rows = _balanced(ctx, rows)
    ro = {"index": index, "info": info, **_collated(ctx, rows)}
    b, labels = ro["batch"], ro["batch"]["labels"]
    slices = [sl for update in ro["micro"] for sl in update]

    def logp_of(model):
        return torch.cat([head_token_stats(model, trunk_hidden(model, **_rows(b, sl)), labels[sl],
                                           temperature=s.temperature, outputs=("logp",)).logp for sl in slices])

    with ctx.timer("logprobs"):
        # the rollout policy's log-probs: for several updates, and for a KL in the reward (verl's old_log_prob)
        ro["old"] = logp_of(ctx.model) if s.updates_per_rollout > 1 or s.kl_in_reward else None
        ro["ref"] = logp_of(ctx.reference) if ctx.reference is not None and s.kl_coef > 0 else None
    if s.kl_in_reward:
        _kl_in_reward(ctx, ro)
    return ro


def _kl_in_reward(ctx: StageContext, ro: dict) -> None:
    """verl's apply_kl_penalty for GRPO: each sample's reward less kl_coef x its summed KL to the reference
    (kl_estimator of the rollout policy's and the reference's log-probs), the advantages recomputed from those
    rewards. A group's samples may sit on several ranks (balance_batch): every rank gathers the rollout's rewards by
    sample, each group's in its order."""
    s = ctx.stage
    mask = ro["batch"]["labels"] != -100
    kl = (kl_estimate(ro["old"], ro["ref"], s.kl_estimator or "k3") * mask).sum(-1)
    mine = {(r["draw"], r["place"], r["sample"]): r["reward"] - s.kl_coef * k for r, k in zip(ro["rows"], kl.tolist())}
    every = gathered_dict(mine)
    keys = sorted(every)  # group after group, each in sample order
    adv = group_advantages(torch.tensor([every[k] for k in keys]), s.group_size, scale=advantage_scale(s))
    where = {k: i for i, k in enumerate(keys)}
    for r in ro["rows"]:
        key = (r["draw"], r["place"], r["sample"])
        r["reward"], r["adv"] = every[key], float(adv[where[key]])
    ro["adv"] = torch.tensor([r["adv"] for r in ro["rows"]])
    ro["rewards"] = torch.tensor([r["reward"] for r in ro["rows"]])
    ro["kl_penalty"] = s.kl_coef * kl


def _sampled_rows(ctx: StageContext, exs: list, positions: list[int], draw: int) -> list[dict]:
    """group_size samples of each example, scored: one row per sample (group after group), all it carries to
    another rank (dynamic sampling, balance_batch) or into a checkpoint: its prompt's draw and place, its tokens and
    the sampler's log-probs, the verifier's score, its reward (the reward functions' sum and DAPO's overlong
    punishment) and each function's part."""
    s = ctx.stage
    groups = _sample(ctx, exs, s.group_size, draw, positions)
    flat = [c for g in groups for c in g]
    rep = [e for e in exs for _ in range(s.group_size)]
    scores = [score(c.text, e.answer, e.choices) for c, e in zip(flat, rep)]  # the verifier's accuracy and format
    total, parts = _rewarded(ctx, rep, flat)
    penalty = [overlong_penalty(len(c.token_ids), s.max_new_tokens, s.overlong_buffer, s.overlong_penalty or 1.0)
               if s.overlong_buffer else 0.0 for c in flat]
    places = [p for p in positions for _ in range(s.group_size)]
    return [{"draw": draw, "place": places[i], "sample": i % s.group_size, "token_ids": c.token_ids,
             "logprobs": c.logprobs,
             "truncated": c.finish_reason == "length", "score": dataclasses.asdict(scores[i]),
             "reward": total[i] + penalty[i], "parts": {k: v[i] for k, v in parts.items()}, "penalty": penalty[i]}
            for i, c in enumerate(flat)]


def _advantages(ctx: StageContext, rows: list[dict]) -> None:
    """Each row's advantage from its group's rewards (the groups whole and in order on this rank)."""
    s = ctx.stage
    rewards = torch.tensor([r["reward"] for r in rows])
    scale = advantage_scale(s)
    if scale == "batch":  # the spread of the whole rollout batch, every rank's groups
        rank, size = world()
        every = gathered_rows(rewards.to(_device(ctx))).cpu()
        adv = group_advantages(every, s.group_size, scale="batch").view(size, -1)[rank]
    else:  # a group lives on one rank: its own rewards are all it needs
        adv = group_advantages(rewards, s.group_size, scale=scale)
    for r, a in zip(rows, adv.tolist()):
        r["adv"] = a


def _examples_of(ctx: StageContext, rows: list[dict]) -> list:
    """Each row's example, from its prompt's draw and place."""
    s = ctx.stage
    out = [None] * len(rows)
    for draw in {r["draw"] for r in rows}:
        idx = [i for i, r in enumerate(rows) if r["draw"] == draw]
        exs = examples_at(ctx, draw, s.batch_size * s.updates_per_rollout, [rows[i]["place"] for i in idx])
        for i, e in zip(idx, exs):
            out[i] = e
    return out


def _rewarded(ctx: StageContext, exs: list, completions: list) -> tuple[list[float], dict]:
    """Each completion's reward from the stage's reward functions (reward_plugins.py) and each function's values."""
    s = ctx.stage
    columns = {"prompts": [e.problem for e in exs], "completions": [c.text for c in completions],
               "completion_ids": [list(c.token_ids) for c in completions], "answer": [e.answer for e in exs],
               "choices": [e.choices for e in exs], "question_type": [e.question_type for e in exs],
               "max_new_tokens": s.max_new_tokens}
    for key in sorted({k for e in exs for k in e.meta} - set(columns)):  # every other column of the dataset
        columns[key] = [e.meta.get(key) for e in exs]
    return score_batch(reward_fns(s.rewards), columns, [e.id for e in exs], s.reward_workers or 0)


def _balanced(ctx: StageContext, rows: list[dict]) -> list[dict]:
    """Each update's samples balanced across the ranks (context.balanced_over_ranks; advantages are computed
    before, where each group was sampled)."""
    s = ctx.stage
    prompt = prompt_tokens(ctx, _examples_of(ctx, rows[:: s.group_size]))  # once per prompt, not per sample
    lengths = [prompt[i // s.group_size] + len(r["token_ids"]) for i, r in enumerate(rows)]
    n = update_rows(ctx)
    return [row for u in range(s.updates_per_rollout)
            for row in balanced_over_ranks(ctx, rows[u * n : (u + 1) * n], lengths[u * n : (u + 1) * n])]


def _collated(ctx: StageContext, rows: list[dict]) -> dict:
    """A rollout's rows as the update reads them: the batch (collated from the token ids: also how a resumed run
    rebuilds it), its micro-batches, advantages, rewards and the sampler's log-probs."""
    s = ctx.stage
    rep = _examples_of(ctx, rows)
    b = collate_token_responses(ctx.processor, [e.problem for e in rep], [e.images for e in rep],
                                [r["token_ids"] for r in rows])
    truncated = torch.tensor([r["truncated"] for r in rows])
    if s.mask_truncated:  # DAPO's overlong filtering: a response cut at max_new_tokens counts in no loss or mean
        b["labels"][truncated] = -100
    scores = [Reward(**r["score"]) for r in rows]
    return {"rows": rows, "batch": b, "micro": rollout_micro_slices(ctx, b), "scores": scores,
            "adv": torch.tensor([r["adv"] for r in rows]),
            "rewards": torch.tensor([r["reward"] for r in rows]),
            "penalty": torch.tensor([r.get("penalty", 0.0) for r in rows]),
            "sampler": _sampler_logp_grid(rows, b),
            "truncated": truncated.float()}


def _rollout_examples(ctx: StageContext, index: int) -> tuple[list, list[int]]:
    """This rank's slice of each of rollout `index`'s update minibatches, in update order, and their
    places in the global rollout batch."""
    s = ctx.stage
    return batch_examples(ctx, index, s.batch_size * s.updates_per_rollout, s.updates_per_rollout)


def rollout_state(ctx: StageContext) -> dict | None:
    """What a checkpoint taken inside a rollout batch keeps of it: its rows (each sample's prompt place, tokens,
    sampler log-probs, reward and advantage) and old/reference log-probs, the policy that sampled them being gone by
    then (the batch itself is re-collated from the tokens on resume). None when no rollout is in progress."""
    ro = ctx.extra.get("rollout")
    if ro is None:
        return None
    return {k: ro[k] for k in ("index", "rows", "old", "ref", "info", "kl_penalty") if k in ro}


def restore_rollout(ctx: StageContext, state: dict) -> None:
    """Continue inside a rollout batch exactly where a checkpoint left it."""
    if "rows" not in state:
        raise ValueError("this checkpoint was taken inside a GRPO rollout by an older vlmfast (no per-sample rows): "
                         "resume it with that version, or resume from an earlier checkpoint")
    rows = [{"draw": state["index"], **r} for r in state["rows"]]  # rows written before draws were kept
    ctx.extra["rollout"] = {"info": {}, **state, **_collated(ctx, rows)}


def grpo_step(ctx: StageContext, step: int):
    """One optimizer update on the step's minibatch of the current rollout batch; a new rollout every
    `updates_per_rollout` steps (later minibatches see ratios != 1: that is where clipping acts). The
    rollout happens here; the update's forwards happen as the returned micro-batches are iterated."""
    s = ctx.stage
    index, part = divmod(step, s.updates_per_rollout)
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
    whole = _rows(ro["batch"], update)
    rows = whole["labels"].shape[0]
    aggregation = aggregation_of(s)
    n = None  # a per-sequence mean: each micro-batch weighs by its rows
    if aggregation == "token-mean":  # the global batch's tokens (bnpo: the rank's own)
        n = (rank_share_of_tokens(whole["labels"], _device(ctx)) if s.loss_type != "bnpo" else
             (whole["labels"] != -100).sum().float().clamp(min=1).to(_device(ctx)))
    parts = []  # (metrics, tokens, rows) per micro-batch
    for sl in micro:
        loss, m, labels = _grpo_forward(ctx, ro, sl, n)
        if n is None:  # a per-sequence mean over this micro-batch: its share of the update's mean
            loss = loss * (labels.shape[0] / rows)
        parts.append((m, (labels != -100).sum().item(), labels.shape[0]))
        last = sl.stop == update.stop
        if last:  # the trainer combines the ranks' token means weighted by their tokens
            tokens = float(sum(t for _, t, _ in parts))  # the ranks' token means combine weighted by their tokens
            token_means = _TOKEN_MEAN_METRICS + (("pg_loss",) if aggregation == "token-mean" else ())
            ctx.extra["metric_weights"] = {**dict.fromkeys(token_means, tokens), **{  # rewards: over scored samples
                f"reward/{k}": sum(r["parts"][k] is not None for r in ro["rows"][update])
                for k in ro["rows"][0]["parts"]}}
        yield loss, (_grpo_metrics(ro, update, whole, parts, aggregation) if last else None)


def _grpo_forward(ctx: StageContext, ro: dict, sl: slice, n):
    """GRPO's loss on rows `sl` of the rollout batch (token means over n tokens when given): (loss, metrics,
    labels)."""
    s = ctx.stage
    b = _rows(ro["batch"], sl)
    labels = b["labels"]
    ref = None if ro["ref"] is None else ro["ref"][sl]
    old = None if ro["old"] is None else ro["old"][sl]  # None: on-policy, the update's own log-probs

    def loss_fn(h, w):
        return grpo_loss(h, w, labels, old, ro["adv"][sl], ref_logp=ref, num_items_in_batch=n,
                         sampler_logp=ro["sampler"][sl], **loss_options(s))

    loss, m = _policy_loss(ctx, b, loss_fn)
    return loss, m, labels


def aggregation_of(s) -> str:
    """The stage's aggregation: its loss_type's, else its own."""
    return LOSS_TYPES.get(s.loss_type, (None, s.aggregation))[1]


def advantage_scale(s) -> str:
    """The stage's advantage scaling: its own, else none for Dr. GRPO (no std scaling), group otherwise."""
    return s.advantage_scale or ("none" if s.loss_type == "dr_grpo" else "group")


def loss_options(s) -> dict:
    """grpo_loss's hyperparameters from the stage (defaults resolved)."""
    kl_coef = 0.0 if s.kl_in_reward else s.kl_coef  # in the reward instead (kl_in_reward): not in the loss
    return dict(clip_low=s.clip_low, clip_high=s.clip_high, dual_clip=s.dual_clip, kl_coef=kl_coef,
                entropy_coef=s.entropy_coef, aggregation=aggregation_of(s), temperature=s.temperature,
                tis_cap=s.tis_cap, loss_type=s.loss_type, kl_estimator=s.kl_estimator or "k3",
                is_level=s.is_level or "token", is_mode=s.is_mode or "truncate", is_cap_low=s.is_cap_low,
                max_new_tokens=s.max_new_tokens)


def _grpo_metrics(ro: dict, update: slice, whole: dict, parts: list, aggregation: str) -> dict:
    """The update's metrics from its micro-batches' (token means weighted by tokens, pg_loss as aggregated)
    and the rollout's rewards of its rows."""
    token_means = _TOKEN_MEAN_METRICS + (("pg_loss",) if aggregation == "token-mean" else ())
    m = combined_metrics([(m, {"tokens": t, "rows": r}) for m, t, r in parts], dict.fromkeys(token_means, "tokens"))
    m.pop("loss", None)
    scores = ro["scores"][update]
    m["reward"] = ro["rewards"][update].mean()
    for name in ro["rows"][0]["parts"]:  # each reward function's mean over the samples it scored
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
    # this rank's real tokens in the update: over the ranks their mean and max (max / mean: what balance_batch evens)
    m["rank_tokens"] = m["rank_tokens_max"] = whole["attention_mask"].sum().float()
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
                "kl_in_reward": "a KL penalty in the reward"}

    def needs_reference(self, s):
        return s.kl_coef > 0  # the KL penalty to pi_ref

    def rows_per_rank(self, s, world_size):
        return s.batch_size // world_size * s.group_size  # an update: its prompts x group_size samples

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
