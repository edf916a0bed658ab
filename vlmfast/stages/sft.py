"""The SFT step, with gentle negatives when the stage has them."""

from __future__ import annotations

from ..data.collate import collate
from ..losses import sft_gentle_negatives_loss, sft_loss
from ..models import call_head, trunk_hidden
from .context import (
    StageContext,
    _counted,
    _dataset_negative,
    _device,
    _policy_loss,
    _target,
    batch_examples,
    example_rngs,
    mean_over_ranks,
    rank_share_of_tokens,
)


def sft_step(ctx: StageContext, step: int):
    s = ctx.stage
    exs, positions = batch_examples(ctx, step, s.batch_size)
    b = collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs],
                [_target(ctx, e.answer, e) for e in exs])
    if s.gentle is None:
        n = rank_share_of_tokens(b["labels"], _device(ctx))
        return _policy_loss(ctx, b, lambda h, w: sft_loss(h, w, b["labels"], temperature=s.temperature,
                                                          label_smoothing=s.label_smoothing, num_items_in_batch=n))
    rngs = example_rngs(ctx, step, positions)
    nb = collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs],
                 [_target(ctx, _dataset_negative(e, rng), e) for e, rng in zip(exs, rngs)])

    def forward():
        hidden = trunk_hidden(ctx.model, **_counted(b, ctx))
        neg_hidden = trunk_hidden(ctx.model, **_counted(nb, ctx))
        return call_head(ctx.model, hidden, lambda h, w: sft_gentle_negatives_loss(
            h, w, b["labels"], neg_hidden, nb["labels"], temperature=s.temperature, mean_over_parts=mean_over_ranks,
            **s.gentle))

    return ctx.forward(forward)
