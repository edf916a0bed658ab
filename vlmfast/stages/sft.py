"""The SFT step, with gentle negatives when the stage has them."""

from __future__ import annotations

from ..data.collate import collate
from ..losses import sft_gentle_negatives_loss, sft_loss
from ..losses.sft import _check_gentle, _check_sft
from ..models import call_head, trunk_hidden
from .base import Stage, check_loss
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


GENTLE_KEYS = {"variant", "lam", "margin", "alpha"}


class SFT(Stage):
    types = ("sft",)
    samples_in_training = False
    step = staticmethod(sft_step)
    own_keys = {"gentle": "gentle negatives"}

    def sequences_per_row(self, s):
        return 2 if s.gentle is not None else 1  # each target and its negative

    def grouped_loss(self, s):
        return s.gentle is not None and s.gentle.get("variant", "hinge") == "hinge"  # a hinge per sequence

    def check(self, s, key, bad):
        check_loss(bad, key, _check_sft, label_smoothing=s.label_smoothing, temperature=s.temperature)
        if s.gentle is not None:
            extra = set(s.gentle) - GENTLE_KEYS
            if extra:
                bad(f"{key}.gentle", f"unknown key(s) {sorted(extra)}; known: {sorted(GENTLE_KEYS)}")
            check_loss(bad, f"{key}.gentle", _check_gentle, **s.gentle)


STAGE = SFT()
