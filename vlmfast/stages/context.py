"""What every stage shares: the StageContext the trainer hands each step, the world and the rows each rank
holds, the data order and sampling seeds (functions of run seed, stage index and step, so a resumed run sees exactly
the batches an uninterrupted one would), the policy's loss through the fused head, sampling, and row slicing.

Each stage type's step lives in its own module (sft, opd, grpo, preference): `*_step(ctx, step)` returns (loss,
metrics) for the policy `ctx.model`, or (GRPO with `micro_batch_size`) an iterator of micro-batches' (loss share,
metrics) whose shares add up to the step's loss, the step's metrics on the last pair and None before: the trainer
runs backward on each share before the next micro-batch's forward, so only one micro-batch's activations are alive
at a time. The loss is computed through `call_head` (the fused op as the lm_head's forward: ZeRO-3 safe) and never
sees full logits; the training forward runs through `ctx.forward` (the DeepSpeed engine's forward).
"""

from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass, field

import torch

from ..data.collate import END_OF_TURN, batch_rows, collate, to_device
from ..data.prompts import reasoning_of, target_response
from ..lora import AdaptersOff, adapters_disabled
from ..models import call_head, eval_mode, trunk_hidden
from ..ranks import balanced_rows, reduce_over_ranks
from ..rewards import is_correct
from ..rollout import Sampling
from ..timing import StepTimer


@dataclass
class StageContext:
    cfg: object  # Config
    stage: object  # StageConfig
    index: int
    model: object  # the policy (engine.module)
    processor: object
    train: list  # Examples
    engine: object = None  # rollout engine on the policy
    reference: object = None  # pi_ref (dpo, cw_dpo, grpo with kl): a frozen model, or AdaptersOff (LoRA); read it
    # through `referencing()`
    teacher: object = None  # opd
    l_floor: float | str | None = None
    extra: dict = field(default_factory=dict)
    engine_forward: object = None  # fn -> fn() run as the DeepSpeed engine's forward (zero.engine_forward)
    timer: StepTimer = field(default_factory=StepTimer)
    engine_stale: bool = False  # the engine holds weights older than the policy's (set after each update)
    # (offload, reload): the optimizer states off the GPU while a sleeping engine generates (vllm.offload_optimizer)
    optimizer_states: tuple | None = None

    def forward(self, fn):
        """fn() as the policy's training forward: through the DeepSpeed engine when there is one, which
        counts the micro-steps a gradient accumulates over."""
        return fn() if self.engine_forward is None else self.engine_forward(fn)

    def policy_updated(self) -> None:
        """The policy's weights changed (an optimizer step, a checkpoint loaded): an engine with weights of
        its own must be synced before it samples again. Syncing is lazy: once per rollout, not per update."""
        self.engine_stale = getattr(self.engine, "holds_weights", False)

    @contextlib.contextmanager
    def referencing(self):
        """pi_ref for the block: the frozen reference model, or a LoRA policy with its adapters off (the base the
        stage started from: no second copy of the model)."""
        if isinstance(self.reference, AdaptersOff):
            with adapters_disabled(self.reference.model) as base, eval_mode(base):
                yield base
        else:
            yield self.reference

    @contextlib.contextmanager
    def generating(self, engine=None):
        """The generation engine (default the policy's) ready for the block: synced with the policy when stale
        (timed as the step's sync); an engine that sleeps (colocated vLLM) wakes for the block only and sleeps
        after it, so no training forward, log-prob pass or whole-model gather runs while it holds its memory."""
        engine = engine or self.engine
        policy = engine is self.engine
        offload, reload = self.optimizer_states or (None, None)
        if offload is not None:
            offload()
        try:
            with engine.awake(self.model if policy else None, stale=policy and self.engine_stale,
                              timed_sync=lambda: self.timer("sync")) as ready:
                if policy:
                    self.engine_stale = False
                yield ready
        finally:
            if reload is not None:
                reload()


def step_seed(ctx: StageContext, step: int) -> int:
    return (ctx.cfg.run.seed * 1_000_003 + ctx.index * 10_007 + step) % (2**31 - 1)


def world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the data-parallel ranks (itself in one process); no gradient flows through it."""
    _, size = world()
    if size == 1:
        return x
    return reduce_over_ranks(x) / size  # a host tensor (gentle negatives' counts) goes to the GPU under NCCL


def rank_share_of_tokens(labels: torch.Tensor, device) -> torch.Tensor:
    """The step's response tokens over all ranks, divided by the number of ranks: a rank that divides its
    summed token loss by this makes DeepSpeed's mean over ranks the exact global token mean (TRL's "dapo"
    normalisation), so every rank count trains as one process does. No response token on any rank: 1 (the summed
    loss is 0, and 0 / 0 would be a NaN step)."""
    n = mean_over_ranks((labels != -100).sum().to(device=device, dtype=torch.float32))
    return torch.where(n > 0, n, torch.ones_like(n))


def rank_positions(ctx: StageContext, n: int, parts: int = 1) -> list[int]:
    """Places in the step's global batch of n examples that this rank holds. The batch is `parts`
    consecutive update minibatches (GRPO's updates per rollout) and the rank holds its contiguous slice
    of each, so update u on every rank count covers the same examples as in one process."""
    rank, size = world()
    per_part = n // parts
    if per_part % size:
        raise ValueError(f"stages[{ctx.index}].batch_size={per_part} is not divisible by the {size} ranks")
    mb = per_part // size
    return [u * per_part + rank * mb + j for u in range(parts) for j in range(mb)]


def batch_examples(ctx: StageContext, step: int, n: int, parts: int = 1) -> tuple[list, list[int]]:
    """This rank's share of the step's global batch of n examples, and their places in it: the same
    global batch whatever the number of ranks, so 2 ranks match 1 process.

    Examples are drawn as epoch permutations (TRL's RepeatSampler draws the same way): the stage's i-th example
    is example perm_e[i mod L] of the L training examples, e = i div L, perm_e a permutation seeded by (run seed,
    stage, e). An epoch visits every example once (drawing with replacement repeated ~12% of a 512-prompt batch),
    and a resumed run draws what an uninterrupted one would: the draw is a function of the step alone."""
    positions = rank_positions(ctx, n, parts)
    return examples_at(ctx, step, n, positions), positions


def examples_at(ctx: StageContext, step: int, n: int, positions: list[int]) -> list:
    """The examples at `positions` of the step's global batch of n examples (batch_examples' draw)."""
    L = len(ctx.train)
    perms = {}
    out = []
    for p in positions:
        epoch, r = divmod(step * n + p, L)
        if epoch not in perms:
            seed = (ctx.cfg.run.seed * 1_000_003 + ctx.index * 10_007 + epoch * 7_919 + 1) % (2**31 - 1)
            perms[epoch] = torch.randperm(L, generator=torch.Generator().manual_seed(seed))
        out.append(ctx.train[int(perms[epoch][r])])
    return out


def prompt_tokens(ctx: StageContext, exs: list) -> list[int]:
    """Each example's prompt tokens, images included, as a batch collates them."""
    return collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs])["attention_mask"].sum(1).tolist()


def balanced_over_ranks(ctx: StageContext, rows: list[dict], lengths) -> list[dict]:
    """This rank's `rows` (each carrying what its rank made of it: its place in the global batch, sampled tokens)
    redistributed across the ranks so each holds as many and about as many tokens (`lengths()`: the rows' tokens
    through the forward, prompts and responses, counted only when balancing), as verl's _balance_batch does: the
    slowest rank sets every step's pace and, under a token budget, the micro-batch count. Every loss is the same
    whichever rank holds a row (global token means; means over rows or pairs, as many on every rank). The rows as
    they are on one rank or with balance_batch: false."""
    if ctx.stage.balance_batch is False or world()[1] == 1:
        return rows
    return balanced_rows(rows, lengths())


def position_seeds(ctx: StageContext, step: int, positions: list[int]) -> list[int]:
    """Seeds of examples by their place in the step's global batch: what is sampled or drawn for an
    example never depends on how many ranks share the batch."""
    base = step_seed(ctx, step) * 7919
    return [(base + p) % (2**31 - 1) for p in positions]


def example_rngs(ctx: StageContext, step: int, positions: list[int]) -> list[random.Random]:
    """One random stream per example (its negative, on- or off-policy), seeded by its global place."""
    return [random.Random(seed) for seed in position_seeds(ctx, step, positions)]


def _device(ctx: StageContext) -> torch.device:
    return next(ctx.model.parameters()).device


def on_device(ctx: StageContext, batch):
    """A (micro-)batch collated on the host (a dict, or one per-token tensor), on the policy's device for its forward
    and loss."""
    return to_device(batch, _device(ctx))


def _counted(batch: dict, ctx: StageContext) -> dict:
    """The batch, its tokens counted for the tokens/s metric of the policy's step."""
    ctx.extra["tokens"] = ctx.extra.get("tokens", 0) + batch["attention_mask"].sum()  # read once per step
    return batch


def _policy_loss(ctx: StageContext, batch: dict, loss_fn):
    """loss_fn(hidden, lm_head weight[, bias]) on the policy's trunk states of `batch`, as its training forward
    (through the DeepSpeed engine; the head through its own module: ZeRO-3 safe)."""
    return ctx.forward(lambda: call_head(ctx.model, trunk_hidden(ctx.model, **_counted(batch, ctx)), loss_fn))


def _target(ctx, answer: str, ex=None) -> str:
    return target_response(reasoning_of(ctx.cfg, ex), answer)


def _target_ids(ctx, ex) -> list[int]:
    """The dataset target of an example as response token ids, ending its turn."""
    tok = ctx.processor.tokenizer
    return tok(_target(ctx, ex.answer, ex) + END_OF_TURN, add_special_tokens=False)["input_ids"]


def _sample(ctx, exs, n, step, positions: list[int]):
    """n samples per example, seeded by the examples' places in the step's global batch."""
    s = ctx.stage
    with ctx.generating() as engine, ctx.timer("generate"):
        return engine.generate([e.problem for e in exs], [e.images for e in exs], n=n,
                               sampling=Sampling(temperature=s.temperature, max_new_tokens=s.max_new_tokens),
                               seeds=position_seeds(ctx, step, positions))


def _sample_subset(ctx, exs, positions: list[int], idx: list[int], n: int, step: int) -> list:
    """n samples for each of exs[i], i in idx (this rank's on-policy share). Every rank calls generate on
    as many prompts as the rank with the most: under ZeRO-3 generation is a collective (a gather, or a
    gather per layer and token), so a rank that skipped it or ran fewer batches would hang the others.
    Padding prompts repeat a real one and their samples are dropped (seeded per row: they change nothing)."""
    count = len(idx)
    if world()[1] > 1:
        count = int(reduce_over_ranks(torch.tensor([count]), "max").item())
    if count == 0:
        return []
    padded = idx + [idx[0] if idx else 0] * (count - len(idx))
    return _sample(ctx, [exs[i] for i in padded], n, step, [positions[i] for i in padded])[: len(idx)]


def even_row_slices(n: int, parts: int) -> list[slice]:
    """n rows in `parts` consecutive slices whose sizes differ by one at most (the larger first)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def token_budget_slices(lengths: list[int], budget: int, count: int | None = None) -> list[slice]:
    """Consecutive rows in slices of at most `budget` tokens each (`lengths`: each row's real tokens; a row longer
    than the budget gets a slice of its own), then the largest slices halved until there are `count` of them (every
    rank must run as many forwards: ZeRO-3 gathers each layer's parameters collectively). `count` can be at most
    the number of rows."""
    bounds, tokens = [0], 0
    for i, n in enumerate(lengths):
        if i > bounds[-1] and tokens + n > budget:
            bounds.append(i)
            tokens = 0
        tokens += n
    slices = [slice(a, b) for a, b in zip(bounds, [*bounds[1:], len(lengths)])]
    if count is not None:
        if count > len(lengths):
            raise ValueError(f"{len(lengths)} rows cannot make {count} micro-batches")
        while len(slices) < count:  # split the slice with most tokens (of those with two rows or more)
            i = max((k for k, sl in enumerate(slices) if sl.stop - sl.start > 1),
                    key=lambda k: sum(lengths[slices[k]]))
            sl = slices[i]
            mid = sl.start + (sl.stop - sl.start) // 2
            slices[i : i + 1] = [slice(sl.start, mid), slice(mid, sl.stop)]
    return slices


def micro_slices(ctx: StageContext, lengths: list[int]) -> list[slice]:
    """A rank's rows (`lengths`: each row's real tokens; a pair's, both sequences') in micro-batches, one forward
    and backward each: whole rows of at most max_tokens_per_micro_batch tokens together (as many micro-batches on
    every rank: the largest count), else micro_batch_size rows as even as they go, else all rows in one."""
    s = ctx.stage
    if s.max_tokens_per_micro_batch:
        mine = len(token_budget_slices(lengths, s.max_tokens_per_micro_batch))
        count = int(reduce_over_ranks(torch.tensor([float(mine)], dtype=torch.float64), "max").item())
        return token_budget_slices(lengths, s.max_tokens_per_micro_batch, count)
    if s.micro_batch_size:
        return even_row_slices(len(lengths), -(-len(lengths) // s.micro_batch_size))
    return [slice(0, len(lengths))]


def combined_metrics(parts: list[tuple[dict, dict]], weight_of: dict[str, str]) -> dict:
    """One step's metrics from its micro-batches' (metrics, weights) pairs: a metric is a mean over the micro-batch's
    weights[weight_of.get(key, "rows")] (its tokens, its rows, ...) and combines weighted by them, so the result is
    the whole batch's mean; a count (weight_of "sum") adds up; *_min / *_max take the extreme."""
    out = {}
    for key, first in parts[0][0].items():
        values = torch.stack([torch.as_tensor(m[key], device=first.device).double() for m, _ in parts])
        if weight_of.get(key) == "sum":
            out[key] = values.sum().to(first.dtype)
        elif key.endswith("_min") or key.endswith("_max"):
            out[key] = (values.min() if key.endswith("_min") else values.max()).to(first.dtype)
        else:
            w = torch.tensor([float(weights[weight_of.get(key, "rows")]) for _, weights in parts],
                             dtype=torch.float64, device=first.device)
            out[key] = ((values * w).sum() / w.sum().clamp(min=1e-12)).to(first.dtype)
    return out


def in_micro_batches(ctx: StageContext, slices: list[slice], forward, weight_of: dict[str, str],
                     rank_tokens: int | None = None):
    """forward(sl) -> (loss share, metrics, weights) for each micro-batch `sl`, run as the trainer iterates: yields
    (share, None) until the last, which carries the step's metrics (combined_metrics; `loss` the sum of the shares;
    rank_tokens and rank_tokens_max the rank's real tokens, when given: their mean and largest over the ranks).
    The ranks' metrics then combine weighted by their totals of the same weights."""
    parts, total = [], 0.0
    for i, sl in enumerate(slices):
        share, m, weights = forward(sl)
        parts.append((m, weights))
        total = total + share.detach()
        if i < len(slices) - 1:
            yield share, None
            continue
        totals = {name: sum(float(w[name]) for _, w in parts) for name in weights}
        ctx.extra["metric_weights"] = {key: totals[w] for key, w in weight_of.items() if w != "sum"}
        step = {**combined_metrics(parts, weight_of), "loss": total}
        if rank_tokens is not None:
            step["rank_tokens"] = step["rank_tokens_max"] = torch.tensor(float(rank_tokens))
        yield share, step


def _pair_rows(batch: dict, sl: slice, pairs: int) -> dict:
    """Pairs `sl` of a batch of 2 x `pairs` rows (every first sequence, then every second: chosen then rejected, a
    target then its negative) as such a batch of their own."""
    first, second = batch_rows(batch, sl), batch_rows(batch, slice(sl.start + pairs, sl.stop + pairs))
    return {k: torch.cat([first[k], second[k]]) for k in first}


NO_ANSWER = "none of the above"  # the negative of an answer with no wrong choice, no number and no negatives


def _dataset_negative(ex, rng: random.Random) -> str:
    """A wrong answer for `ex` as the verifier grades it (a "negative" it calls correct, as a letter answer's own
    choice text or "12 cm?" for "12 cm" would be, pushes a right answer down): one of its negatives, else one of its
    choices, else its first number moved by one."""
    def wrong(candidate) -> bool:
        return not is_correct(str(candidate), ex.answer, ex.choices)

    for pool in (ex.negatives or [], ex.choices or []):
        pool = [str(c) for c in pool if wrong(c)]
        if pool:
            return rng.choice(pool)
    step = rng.choice((-1, 1))
    number = re.search(r"-?\d+", ex.answer)
    if number:
        moved = ex.answer[: number.start()] + str(int(number.group()) + step) + ex.answer[number.end() :]
        if wrong(moved):
            return moved
    return NO_ANSWER
