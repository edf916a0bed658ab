"""The on-policy distillation step: the student's own samples (mixed with dataset targets) and the KL to the
teacher on them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.collate import batch_rows, collate_token_responses
from ..losses import opd_loss
from ..losses.opd import _check_opd
from ..models import frozen_head_weight, trunk_hidden
from .base import Stage, check_loss
from .context import (
    StageContext,
    _device,
    _policy_loss,
    _sample_subset,
    _target_ids,
    balanced_over_ranks,
    batch_examples,
    example_rngs,
    examples_at,
    in_micro_batches,
    micro_slices,
    on_device,
    prompt_tokens,
    rank_share_of_tokens,
)


def opd_step(ctx: StageContext, step: int):
    s = ctx.stage
    exs, positions = batch_examples(ctx, step, s.batch_size)
    # y ~ pi_student for a share opd_on_policy of the batch; the rest are dataset targets (GKD's mix:
    # from random weights the student's own samples say little until it has learned the format)
    on_policy = [rng.random() < s.opd_on_policy for rng in example_rngs(ctx, step, positions)]
    idx = [i for i, flag in enumerate(on_policy) if flag]
    responses = [_target_ids(ctx, e) for e in exs]
    for i, g in zip(idx, _sample_subset(ctx, exs, positions, idx, 1, step)):
        responses[i] = g[0].token_ids
    rows = [{"place": p, "response": r, "on_policy": flag} for p, r, flag in zip(positions, responses, on_policy)]
    rows = balanced_over_ranks(ctx, rows, lambda: [p + len(r) for p, r in zip(prompt_tokens(ctx, exs), responses)])
    exs = examples_at(ctx, step, s.batch_size, [r["place"] for r in rows])
    responses = [r["response"] for r in rows]
    b = collate_token_responses(ctx.processor, [e.problem for e in exs], [e.images for e in exs], responses)
    n = rank_share_of_tokens(b["labels"], _device(ctx))  # the token mean is the whole batch's: shares add up
    share = torch.tensor(sum(r["on_policy"] for r in rows) / len(rows))
    if s.opd_mode == "sampled":
        # sampled-token form: the teacher's per-token log-probs come from a generation engine's score()
        # (a teacher too large to sit beside the student would be served there)
        with ctx.generating(ctx.extra["teacher_engine"]) as teacher, ctx.timer("logprobs"):
            scored = teacher.score([e.problem for e in exs], [e.images for e in exs], responses,
                                   temperature=s.temperature)
        t_logp = torch.zeros(b["labels"].shape)
        for i, lp in enumerate(scored):
            start = int(b["prompt_lengths"][i]) - 1
            t_logp[i, start : start + len(lp)] = torch.tensor(lp)

    def forward(sl):
        part = on_device(ctx, batch_rows(b, sl))
        if s.opd_mode == "full":
            with torch.no_grad(), ctx.timer("logprobs"):  # the teacher sees exactly the same image and prompt
                th = trunk_hidden(ctx.teacher, **part)
            # the fused KL needs the teacher's head in the student's forward and backward: a plain copy
            # (gathered once under ZeRO-3), freed with the micro-batch's graph
            kw = {"teacher": (th, frozen_head_weight(ctx.teacher))}
        else:
            kw = {"teacher_logp": on_device(ctx, t_logp[sl])}
        loss, m = _policy_loss(ctx, part, lambda h, w: opd_loss(h, w, part["labels"], temperature=s.temperature,
                                                                num_items_in_batch=n, **kw))
        m["on_policy_share"] = share
        return loss, m, {"tokens": (part["labels"] != -100).sum(), "rows": sl.stop - sl.start}

    return in_micro_batches(ctx, micro_slices(ctx, b["attention_mask"].sum(1).tolist()), forward,
                            {"kl": "tokens", "entropy": "tokens"},
                            rank_tokens=int(b["attention_mask"].sum()))


class OPD(Stage):
    types = ("opd",)
    step = staticmethod(opd_step)
    own_keys = {"teacher": "teachers", "opd_mode": "distillation modes", "opd_on_policy": "distillation modes"}

    def teacher(self, s):
        return s.teacher

    def teacher_engine(self, s):
        return s.opd_mode == "sampled"  # the teacher scores the student's samples through an engine

    def teacher_head_copy(self, s):
        return s.opd_mode == "full"

    def check(self, s, key, bad):
        if s.teacher is None:
            bad(f"{key}.teacher", "opd needs a teacher checkpoint path")
        if s.teacher.startswith((".", "/")) and not Path(s.teacher).exists():  # hub names load on use
            bad(f"{key}.teacher", f"{s.teacher} not found")
        if s.opd_mode not in ("full", "sampled"):
            bad(f"{key}.opd_mode", f"must be full or sampled, got {s.opd_mode!r}")
        if not 0 <= s.opd_on_policy <= 1:
            bad(f"{key}.opd_on_policy", f"must be in [0, 1], got {s.opd_on_policy}")
        if s.opd_mode == "sampled" and s.opd_on_policy < 1:
            bad(f"{key}.opd_on_policy", "the sampled-token KL estimate needs the student's own samples: "
                "opd_on_policy < 1 works with opd_mode: full")
        check_loss(bad, key, _check_opd, temperature=s.temperature)


STAGE = OPD()
