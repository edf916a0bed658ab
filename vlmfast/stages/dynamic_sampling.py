"""DAPO's dynamic sampling (Yu et al. 2025, section 3.2; verl's algorithm.filter_groups): a rollout keeps only the
groups whose rewards differ (a group of equal rewards has zero advantages: it adds no gradient, only weight to the
means) and samples more prompts until the rollout batch is full, at most max_sampling_rounds rounds; a batch still
short then fills with the equal-reward groups (every rank must hold as many rows). Groups are chosen in the order
they were drawn, over all ranks, and handed out as the ranks would hold a fresh batch: the same rollout on 1 rank
or 8. Each round draws the next prompts of the stage's epoch permutations (the stage's `drawn` count, kept in
checkpoints), so no prompt is skipped."""

from __future__ import annotations

import torch

from ..ranks import gathered_dict, reduce_over_ranks, routed
from .context import batch_examples, world


def filled_rollout(ctx, sample_rows, max_rounds: int) -> tuple[list[dict], dict]:
    """(rows, info): this rank's rows of a full rollout batch (group after group, update after update, as
    `sample_rows(exs, positions, draw)` made them) and what it took: rounds, the share of sampled groups filtered out
    (their rewards all equal), the share of the batch filled with such groups after the last round."""
    s = ctx.stage
    n = s.batch_size * s.updates_per_rollout  # groups the rollout holds, over all ranks
    groups, flat = {}, {}  # (draw, place) -> this rank's group rows; -> whether its rewards are all equal
    rounds = kept = 0
    while True:
        draw = ctx.extra.get("drawn", 0) // n  # the next n prompts of the stage's draw
        ctx.extra["drawn"] = (draw + 1) * n
        exs, positions = batch_examples(ctx, draw, n, s.updates_per_rollout)
        rows = sample_rows(exs, positions, draw)
        for g, place in enumerate(positions):
            group = rows[g * s.group_size : (g + 1) * s.group_size]
            groups[(draw, place)] = group
            flat[(draw, place)] = len({r["reward"] for r in group if r["reward"] == r["reward"]}) <= 1  # NaN: unscored
        rounds += 1
        kept = int(reduce_over_ranks(torch.tensor([float(sum(not f for f in flat.values()))])).item())
        if kept >= n or rounds >= max_rounds:
            break
    every = gathered_dict(flat)
    chosen = ([k for k in sorted(every) if not every[k]] + [k for k in sorted(every) if every[k]])[:n]
    per_update, size = n // s.updates_per_rollout, world()[1]
    owner = {k: (j % per_update) // (per_update // size) for j, k in enumerate(chosen)}
    mine = routed(groups, owner)
    rows = [r for k in chosen if k in mine for r in mine[k]]
    info = {"sampling_rounds": float(rounds), "filtered_groups": sum(every.values()) / len(every),
            "unfilled_groups": max(0, n - kept) / n}
    return rows, info
