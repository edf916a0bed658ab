"""The GRPO rollout batch: prompts drawn (or, with dynamic sampling, drawn until the batch is full), sampled, scored by
the stage's reward functions, advantages per group (the KL to the reference taken from the rewards, with
kl_in_reward), balanced across the ranks, collated, with the old and reference log-probs its updates read; and what
a checkpoint inside it keeps. One row per sample carries all of it: to another rank, or into a checkpoint."""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..data.collate import batch_rows, collate_token_responses
from ..losses import group_advantages
from ..losses.grpo import kl_estimate
from ..models import eval_mode, head_token_stats, trunk_hidden
from ..ranks import gathered_dict, gathered_rows
from ..reward_plugins import reward_fns, score_batch
from ..rewards import Reward, overlong_penalty, score_example
from .context import (
    StageContext,
    _sample,
    balanced_over_ranks,
    batch_examples,
    examples_at,
    micro_slices,
    on_device,
    prompt_tokens,
    world,
)
from .dynamic_sampling import filled_rollout


def advantage_scale(s) -> str:
    """The stage's advantage scaling: its own, else none for Dr. GRPO (no std scaling), group otherwise."""
    return s.advantage_scale or ("none" if s.loss_type == "dr_grpo" else "group")


def update_rows_of(s, world_size: int) -> int:
    """Sequences of one GRPO update on a rank: its prompts x group_size samples."""
    return s.batch_size // world_size * s.group_size


def steps_per_rollout(s) -> int:
    """Optimizer updates one rollout batch serves: its minibatches, times the passes over it."""
    return s.updates_per_rollout * (s.epochs_per_rollout or 1)


def update_rows(ctx: StageContext) -> int:
    """Sequences of one GRPO update on this rank."""
    return update_rows_of(ctx.stage, world()[1])


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
    rows = _balanced(ctx, rows)
    ro = {"index": index, "info": info, **_collated(ctx, rows)}
    slices = [sl for update in ro["micro"] for sl in update]

    def logp_of(model):  # kept on the host with the rollout batch: one copy back, not one per micro-batch
        parts = (on_device(ctx, batch_rows(ro["batch"], sl)) for sl in slices)
        return torch.cat([head_token_stats(model, trunk_hidden(model, **p), p["labels"], temperature=s.temperature,
                                           outputs=("logp",)).logp for p in parts]).cpu()

    with ctx.timer("logprobs"):
        # the rollout policy's log-probs: for several updates, and for a KL in the reward (verl's old_log_prob)
        if steps_per_rollout(s) > 1 or s.kl_in_reward:
            with eval_mode(ctx.model):  # pi_old scores its own samples as it generated them: no LoRA dropout
                ro["old"] = logp_of(ctx.model)
        else:
            ro["old"] = None
        ro["ref"] = None
        if ctx.reference is not None and s.kl_coef > 0:
            with ctx.referencing() as reference:
                ro["ref"] = logp_of(reference)
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
    # k1 unless the stage names one: verl's algorithm.kl_penalty defaults to "kl" (its loss's kl_loss_type to k3)
    kl = (kl_estimate(ro["old"], ro["ref"], s.kl_estimator or "k1") * mask).sum(-1)
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
    scores = [score_example(c.text, e) for c, e in zip(flat, rep)]  # the verifier's accuracy and format
    total, parts = _rewarded(ctx, rep, flat)
    penalty = overlong_penalties(s, [len(c.token_ids) for c in flat])
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
        every = gathered_rows(rewards)  # ranks.py moves it to the GPU under NCCL and back
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


def overlong_penalties(s, lengths: list[int]) -> list[float]:
    """DAPO's soft punishment of each completion of `lengths` tokens (0 without overlong_buffer): overlong_penalty
    (default 1; 0 punishes nothing) times its tokens past max_new_tokens - overlong_buffer, over the buffer."""
    if not s.overlong_buffer:
        return [0.0] * len(lengths)
    factor = 1.0 if s.overlong_penalty is None else s.overlong_penalty
    return [overlong_penalty(n, s.max_new_tokens, s.overlong_buffer, factor) for n in lengths]


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

    @functools.cache
    def lengths() -> list[int]:  # counted once, and only when balancing
        prompt = prompt_tokens(ctx, _examples_of(ctx, rows[:: s.group_size]))  # once per prompt, not per sample
        return [prompt[i // s.group_size] + len(r["token_ids"]) for i, r in enumerate(rows)]

    n = update_rows(ctx)
    return [row for u in range(s.updates_per_rollout)
            for row in balanced_over_ranks(ctx, rows[u * n : (u + 1) * n], lambda u=u: lengths()[u * n : (u + 1) * n])]


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
