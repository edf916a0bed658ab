"""The on-policy distillation step: the student's own samples (mixed with dataset targets) and the KL to the
teacher on them."""

from __future__ import annotations

import torch

from ..data.collate import collate_token_responses
from ..losses import opd_loss
from ..models import frozen_head_weight, trunk_hidden
from .context import (
    StageContext,
    _device,
    _policy_loss,
    _sample_subset,
    _target_ids,
    batch_examples,
    example_rngs,
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
    b = collate_token_responses(ctx.processor, [e.problem for e in exs], [e.images for e in exs], responses)
    n = rank_share_of_tokens(b["labels"], _device(ctx))
    if s.opd_mode == "full":
        with torch.no_grad(), ctx.timer("logprobs"):  # the teacher sees exactly the same image and prompt
            th = trunk_hidden(ctx.teacher, **b)
        # the fused KL needs the teacher's head in the student's forward and backward: a plain copy
        # (gathered once under ZeRO-3), freed with the step's graph
        teacher = (th, frozen_head_weight(ctx.teacher))
        loss, m = _policy_loss(ctx, b, lambda h, w: opd_loss(h, w, b["labels"], teacher=teacher,
                                                             temperature=s.temperature, num_items_in_batch=n))
        m["on_policy_share"] = torch.tensor(len(idx) / len(exs))
        return loss, m
    # sampled-token form: the teacher's per-token log-probs come from a generation engine's score()
    # (a teacher too large to sit beside the student would be served there)
    with ctx.generating(ctx.extra["teacher_engine"]) as teacher, ctx.timer("logprobs"):
        scored = teacher.score([e.problem for e in exs], [e.images for e in exs], responses,
                               temperature=s.temperature)
    t_logp = torch.zeros(b["labels"].shape)
    for i, lp in enumerate(scored):
        start = int(b["prompt_lengths"][i]) - 1
        t_logp[i, start : start + len(lp)] = torch.tensor(lp)
    return _policy_loss(ctx, b, lambda h, w: opd_loss(h, w, b["labels"], teacher_logp=t_logp,
                                                      temperature=s.temperature, num_items_in_batch=n))
