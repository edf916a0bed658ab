"""The DPO and CW-DPO steps: preference pairs (dataset negatives, or the policy's own wrong samples) against the
frozen reference; CW-DPO's automatic log-prob floor."""

from __future__ import annotations

import random

import torch

from ..data.collate import END_OF_TURN, collate, collate_token_responses
from ..losses import cw_dpo_loss, dpo_loss
from ..losses.dpo import _check_cw_dpo, _check_dpo, auto_floor, l_floor_problem
from ..models import eval_mode, head_token_stats, trunk_hidden
from ..ops import sequence_mean
from ..rewards import score_example
from .base import Stage, check_loss
from .context import (
    StageContext,
    _dataset_negative,
    _pair_rows,
    _policy_loss,
    _sample_subset,
    _target,
    _target_ids,
    balanced_over_ranks,
    batch_examples,
    example_rngs,
    examples_at,
    in_micro_batches,
    micro_slices,
    on_device,
    prompt_tokens,
)


def _preference_rows(ctx, exs, positions, step) -> list[dict]:
    """One row per example: its place, chosen = the gold target; rejected = with probability on_policy_fraction one
    of the policy's own wrong samples, whole and as sampled (its token ids: its reasoning, not the gold one with its
    answer pasted in), when one of its 4 samples is wrong (on_policy); else a dataset negative in the gold template."""
    s = ctx.stage
    tok = ctx.processor.tokenizer
    rngs = example_rngs(ctx, step, positions)
    on_policy = [rng.random() < s.on_policy_fraction for rng in rngs]
    rejected: list[list[int] | None] = [None] * len(exs)
    idx = [i for i, flag in enumerate(on_policy) if flag]
    for i, g in zip(idx, _sample_subset(ctx, exs, positions, idx, 4, step)):
        wrong = next((c for c in g if not score_example(c.text, exs[i]).accuracy), None)
        if wrong is not None and wrong.token_ids:
            rejected[i] = list(wrong.token_ids)
    return [{"place": p, "chosen": _target_ids(ctx, e), "on_policy": r is not None,
             "rejected": r if r is not None else tok(_target(ctx, _dataset_negative(e, rng), e) + END_OF_TURN,
                                                     add_special_tokens=False)["input_ids"]}
            for p, e, r, rng in zip(positions, exs, rejected, rngs)]


def dpo_step(ctx: StageContext, step: int):
    """The step's pairs in micro-batches (context.micro_slices over whole pairs): the reference's log-probs of
    each micro-batch first (no grad), then each one's share of the loss (a mean over pairs: weighed by its pairs)
    as the trainer runs it, the step's metrics on the last."""
    s = ctx.stage
    exs, positions = batch_examples(ctx, step, s.batch_size)
    rows = _preference_rows(ctx, exs, positions, step)
    if not STAGE.whole_batch_loss(s):  # l_floor: batch reads the rank's batch as drawn
        rows = balanced_over_ranks(ctx, rows, lambda: [2 * p + len(r["chosen"]) + len(r["rejected"])
                                                       for p, r in zip(prompt_tokens(ctx, exs), rows)])
        exs = examples_at(ctx, step, s.batch_size, [r["place"] for r in rows])
    b = collate_token_responses(ctx.processor, [e.problem for e in exs] * 2, [e.images for e in exs] * 2,
                                [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    on_policy_share = sum(r["on_policy"] for r in rows) / len(rows)
    B = len(exs)
    lengths = (b["attention_mask"][:B].sum(1) + b["attention_mask"][B:].sum(1)).tolist()  # chosen + rejected
    slices = micro_slices(ctx, lengths)
    with torch.no_grad(), ctx.timer("logprobs"), ctx.referencing() as reference:  # pi_ref: the stage-start policy
        ref = {}  # micro-batch start -> (chosen, rejected) sequence sums
        for sl in slices:
            pairs = on_device(ctx, _pair_rows(b, sl, B))
            r = head_token_stats(reference, trunk_hidden(reference, **pairs), pairs["labels"],
                                 temperature=s.temperature, outputs=("logp",), per_sequence=True)
            ref[sl.start] = r.seq_logp.chunk(2)

    def forward(sl):
        pairs, (ref_c, ref_r) = on_device(ctx, _pair_rows(b, sl, B)), ref[sl.start]
        if s.type == "dpo":
            def loss_fn(h, w):
                return dpo_loss(h, w, pairs["labels"], ref_c, ref_r, beta=s.beta, temperature=s.temperature)
        else:
            def loss_fn(h, w):
                return cw_dpo_loss(h, w, pairs["labels"], ref_c, ref_r, beta=s.beta, tau_c=s.tau_c,
                                   l_floor=ctx.l_floor, temperature=s.temperature)
        loss, m = _policy_loss(ctx, pairs, loss_fn)
        m["on_policy_negatives"] = torch.tensor(on_policy_share)
        rows = sl.stop - sl.start
        return loss * (rows / B), m, {"tokens": (pairs["labels"] != -100).sum(), "rows": rows}

    return in_micro_batches(ctx, slices, forward, {"entropy": "tokens"}, rank_tokens=sum(lengths))


@torch.no_grad()
def auto_l_floor(ctx: StageContext, n: int = 64) -> float:
    """l_floor: auto (losses.dpo.auto_floor) over the first n dataset negatives under the policy at stage start."""
    rng = random.Random(ctx.cfg.run.seed)
    exs = ctx.train[: min(n, len(ctx.train))]
    out = []
    for i in range(0, len(exs), 16):
        part = exs[i : i + 16]
        b = on_device(ctx, collate(ctx.processor, [e.problem for e in part], [e.images for e in part],
                                   [_target(ctx, _dataset_negative(e, rng), e) for e in part]))
        with eval_mode(ctx.model):
            r = head_token_stats(ctx.model, trunk_hidden(ctx.model, **b), b["labels"], outputs=("logp",),
                                 per_sequence=True, temperature=ctx.stage.temperature)  # as the loss's lbar
        out += sequence_mean(r.seq_logp, r.seq_count).tolist()
    return auto_floor(out)


class Preference(Stage):
    """DPO and CW-DPO: pairs against the frozen reference; CW-DPO's l_floor fixed at stage start and kept."""

    types = ("dpo", "cw_dpo")
    step = staticmethod(dpo_step)
    # the implicit reward compares the policy with a reference scored without dropout: dropout in the policy's forward
    # would make it noise (nonzero at pi = pi_ref). TRL's DPOConfig.disable_dropout, default True
    trains_without_dropout = True
    own_keys = {"beta": "preference strengths", "tau_c": "cooling weights", "l_floor": "cooling weights",
                "on_policy_fraction": "on-policy negatives"}
    type_keys = {"tau_c": ("cw_dpo",), "l_floor": ("cw_dpo",)}  # plain DPO has no cooling weight

    def needs_reference(self, s):
        return True  # the implicit reward: log-ratios to pi_ref

    def sequences_per_row(self, s):
        return 2  # chosen and rejected

    def grouped_loss(self, s):
        return True  # a pair's loss reads both sequences' sums

    def whole_batch_loss(self, s):
        if s.type == "cw_dpo" and s.l_floor == "batch":
            return "l_floor: batch weighs each pair by the mean of every rejected response of the batch"
        return None

    def check(self, s, key, bad):
        if problem := l_floor_problem(s.l_floor, trainer=True):
            bad(f"{key}.l_floor", problem)
        if not 0 <= s.on_policy_fraction <= 1:
            bad(f"{key}.on_policy_fraction", f"must be in [0, 1], got {s.on_policy_fraction}")
        if s.type == "dpo":
            check_loss(bad, key, _check_dpo, beta=s.beta, temperature=s.temperature)
        else:  # l_floor auto is resolved to a number at stage start
            check_loss(bad, key, _check_cw_dpo, beta=s.beta, tau_c=s.tau_c, temperature=s.temperature,
                       l_floor=0.0 if s.l_floor == "auto" else s.l_floor)

    def open(self, ctx, saved):
        ctx.l_floor = (saved or {}).get("l_floor")  # a resumed stage keeps the floor it started with
        if ctx.stage.type == "cw_dpo" and ctx.l_floor is None:
            ctx.l_floor = auto_l_floor(ctx) if ctx.stage.l_floor == "auto" else ctx.stage.l_floor

    def state(self, ctx):
        return {"l_floor": ctx.l_floor}


STAGE = Preference()
