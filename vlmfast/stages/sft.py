"""The SFT step, with gentle negatives when the stage has them."""

from __future__ import annotations

from ..data.collate import batch_rows, collate
from ..losses import sft_gentle_negatives_loss, sft_loss
from ..losses.sft import _check_gentle, _check_sft, divergent_tokens, gentle_normalizers
from ..models import call_head, trunk_hidden
from .base import Stage, check_loss
from .context import (
    StageContext,
    _counted,
    _dataset_negative,
    _device,
    _policy_loss,
    _target,
    balanced_over_ranks,
    batch_examples,
    example_rngs,
    examples_at,
    in_micro_batches,
    mean_over_ranks,
    micro_slices,
    on_device,
    prompt_tokens,
    rank_share_of_tokens,
)


def sft_step(ctx: StageContext, step: int):
    """The step's batch, in micro-batches (context.micro_slices): each one's share of the loss as the trainer runs
    it, the step's metrics on the last."""
    s = ctx.stage
    exs, positions = _balanced_examples(ctx, step)
    b = collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs],
                [_target(ctx, e.answer, e) for e in exs])
    if s.gentle is None:
        n = rank_share_of_tokens(b["labels"], _device(ctx))  # the token mean is the whole batch's: shares add up

        def forward(sl):
            part = on_device(ctx, batch_rows(b, sl))
            loss, m = _policy_loss(ctx, part, lambda h, w: sft_loss(
                h, w, part["labels"], temperature=s.temperature, label_smoothing=s.label_smoothing,
                num_items_in_batch=n))
            return loss, m, {"tokens": m["tokens"], "rows": sl.stop - sl.start}

        slices = micro_slices(ctx, b["attention_mask"].sum(1).tolist())
        return in_micro_batches(ctx, slices, forward, {"nll": "tokens", "entropy": "tokens", "tokens": "sum"},
                                rank_tokens=int(b["attention_mask"].sum()))
    rngs = example_rngs(ctx, step, positions)
    nb = collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs],
                 [_target(ctx, _dataset_negative(e, rng), e) for e, rng in zip(exs, rngs)])
    # the means divide by the rank's whole batch's counts (every rank's, averaged), so micro-batches' shares add up
    norms = gentle_normalizers(b["labels"], nb["labels"], mean_over_parts=mean_over_ranks)

    def forward_pair(sl):
        pos, neg = on_device(ctx, batch_rows(b, sl)), on_device(ctx, batch_rows(nb, sl))

        def forward():
            hidden = trunk_hidden(ctx.model, **_counted(pos, ctx))
            neg_hidden = trunk_hidden(ctx.model, **_counted(neg, ctx))
            return call_head(ctx.model, hidden, lambda h, w: sft_gentle_negatives_loss(
                h, w, pos["labels"], neg_hidden, neg["labels"], temperature=s.temperature, normalizers=norms,
                **s.gentle))

        loss, m = ctx.forward(forward)
        own = divergent_tokens(pos["labels"], neg["labels"])
        return loss, m, {"tokens": (pos["labels"] != -100).sum(), "rows": sl.stop - sl.start,
                         "own_tokens": own.sum(), "pushed": (own.sum(1) > 0).sum()}

    lengths = (b["attention_mask"].sum(1) + nb["attention_mask"].sum(1)).tolist()  # a target and its negative
    return in_micro_batches(ctx, micro_slices(ctx, lengths), forward_pair,
                            {"nll_pos": "tokens", "entropy": "tokens", "nll_neg": "own_tokens",
                             "hinge_active": "pushed"}, rank_tokens=sum(lengths))


def _balanced_examples(ctx: StageContext, step: int) -> tuple[list, list[int]]:
    """This rank's examples of the step and their places, balanced across the ranks by their targets' (and
    negatives') tokens. What a row holds follows from its place alone (its negative is drawn by its place's seed),
    so only the places travel."""
    s = ctx.stage
    exs, positions = batch_examples(ctx, step, s.batch_size)

    def lengths():  # a target's (and its negative's, drawn by its place's seed) tokens with the prompt's
        tok = ctx.processor.tokenizer
        rngs = example_rngs(ctx, step, positions)
        answers = [[e.answer] + ([_dataset_negative(e, rng)] if s.gentle is not None else [])
                   for e, rng in zip(exs, rngs)]
        return [sum(prompt + len(tok(_target(ctx, a, e), add_special_tokens=False)["input_ids"]) for a in both)
                for e, both, prompt in zip(exs, answers, prompt_tokens(ctx, exs))]

    rows = balanced_over_ranks(ctx, [{"place": p} for p in positions], lengths)
    places = [r["place"] for r in rows]
    if places == positions:
        return exs, positions
    return examples_at(ctx, step, s.batch_size, places), places


GENTLE_KEYS = {"variant", "lam", "margin", "alpha"}


class SFT(Stage):
    types = ("sft",)
    samples_in_training = False
    step = staticmethod(sft_step)
    own_keys = {"gentle": "gentle negatives", "label_smoothing": "label smoothing"}

    def sequences_per_row(self, s):
        return 2 if s.gentle is not None else 1  # each target and its negative

    def grouped_loss(self, s):
        return s.gentle is not None and s.gentle.get("variant", "hinge") == "hinge"  # a hinge per sequence

    def check(self, s, key, bad):
        check_loss(bad, key, _check_sft, label_smoothing=s.label_smoothing, temperature=s.temperature)
        if s.gentle is not None and s.label_smoothing:
            bad(f"{key}.label_smoothing", "is plain SFT's: the gentle-negatives loss has none (it would be ignored)")
        if s.gentle is not None:
            extra = set(s.gentle) - GENTLE_KEYS
            if extra:
                bad(f"{key}.gentle", f"unknown key(s) {sorted(extra)}; known: {sorted(GENTLE_KEYS)}")
            check_loss(bad, f"{key}.gentle", _check_gentle, **s.gentle)


STAGE = SFT()
