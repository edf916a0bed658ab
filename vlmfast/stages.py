"""What differs between stages: how a step's batch and loss are made. One small function per stage
type; the loop in train.py shares everything else.

Each `*_step(ctx, step)` returns (loss, metrics) for the policy `ctx.model`, or (GRPO with
`micro_batch_size`) an iterator of micro-batches' (loss share, metrics) whose shares add up to the step's
loss, the step's metrics on the last pair and None before: the trainer runs backward on each share before
the next micro-batch's forward, so only one micro-batch's activations are alive at a time. The loss is
computed through `call_head` (the fused op as the lm_head's forward: ZeRO-3 safe) and never sees full
logits; the training forward runs through `ctx.forward` (the DeepSpeed engine's forward).
Data order and sampling seeds are functions of (run seed, stage index, step), so a resumed run sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field

import torch

from .data.collate import END_OF_TURN, collate, collate_token_responses
from .data.prompts import reasoning_of, target_response
from .losses import cw_dpo_loss, dpo_loss, group_advantages, grpo_loss, opd_loss, sft_gentle_negatives_loss, sft_loss
from .models import call_head, frozen_head_weight, head_token_stats, trunk_hidden
from .ops import sequence_mean
from .ranks import gathered_rows
from .rewards import Reward, score
from .rollout import Sampling
from .timing import StepTimer


@dataclass
class StageContext:
    cfg: object  # Config
    stage: object  # StageConfig
    index: int
    model: object  # the policy (engine.module)
    processor: object
    train: list  # Examples
    engine: object = None  # rollout engine on the policy
    reference: object = None  # frozen pi_ref (dpo, cw_dpo, grpo with kl)
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
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x / size


def rank_share_of_tokens(labels: torch.Tensor, device) -> torch.Tensor:
    """The step's response tokens over all ranks, divided by the number of ranks: a rank that divides its
    summed token loss by this makes DeepSpeed's mean over ranks the exact global token mean (TRL's "dapo"
    normalisation), so every rank count trains as one process does."""
    return mean_over_ranks((labels != -100).sum().to(device=device, dtype=torch.float32))


def rows_per_rank(stage, world_size: int) -> int:
    """Sequences of one step's batch on each rank (a GRPO update: its prompts x group_size samples)."""
    return stage.batch_size // world_size * (stage.group_size if stage.type == "grpo" else 1)


def sequences_per_rank(stage, world_size: int) -> int:
    """Sequences one step's forward passes hold on each rank: rows_per_rank, twice for a preference pair (chosen and
    rejected) and for SFT with gentle negatives (each target and its negative)."""
    pairs = stage.type in ("dpo", "cw_dpo") or (stage.type == "sft" and stage.gentle is not None)
    return rows_per_rank(stage, world_size) * (2 if pairs else 1)


def needs_reference(stage) -> bool:
    """The stage reads a frozen reference model's log-probs: DPO's and CW-DPO's implicit reward, GRPO's KL penalty
    (kl_coef > 0). The trainer loads it; the plan counts it."""
    return stage.type in ("dpo", "cw_dpo") or (stage.type == "grpo" and stage.kl_coef > 0)


def update_rows(ctx: StageContext) -> int:
    """Sequences of one GRPO update on this rank."""
    return rows_per_rank(ctx.stage, world()[1])


def forward_rows(ctx: StageContext) -> int:
    """Sequences of one forward on this rank at most: an update's micro-batch (micro_batch_size, default the whole
    update), and the slice size of every no-grad recompute over a rollout batch (old and reference
    log-probs), so none is larger."""
    return ctx.stage.micro_batch_size or update_rows(ctx)


def micro_batches_per_step(stage, world_size: int) -> int:
    """Backward passes per step: GRPO's update split into micro-batches of at most micro_batch_size rows per rank
    (as even as they go: 20 rows at most 8 are 7, 7 and 6), else one. The same count on every rank, whatever the
    world size (each rank holds the same rows): ZeRO-3 needs it."""
    if stage.type != "grpo" or not stage.micro_batch_size:
        return 1
    return -(-rows_per_rank(stage, world_size) // stage.micro_batch_size)


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
    L = len(ctx.train)
    positions = rank_positions(ctx, n, parts)
    perms = {}
    out = []
    for p in positions:
        epoch, r = divmod(step * n + p, L)
        if epoch not in perms:
            seed = (ctx.cfg.run.seed * 1_000_003 + ctx.index * 10_007 + epoch * 7_919 + 1) % (2**31 - 1)
            perms[epoch] = torch.randperm(L, generator=torch.Generator().manual_seed(seed))
        out.append(ctx.train[int(perms[epoch][r])])
    return out, positions


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


def _counted(batch: dict, ctx: StageContext) -> dict:
    """The batch, its tokens counted for the tokens/s metric of the policy's step."""
    ctx.extra["tokens"] = ctx.extra.get("tokens", 0) + int(batch["attention_mask"].sum())
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


def _dataset_negative(ex, rng: random.Random) -> str:
    if ex.negatives:
        return rng.choice(ex.negatives)
    if ex.choices:
        return rng.choice([c for c in ex.choices if c != ex.answer] or ex.choices)
    try:
        return str(int(float(ex.answer)) + rng.choice((-1, 1)))
    except ValueError:
        return ex.answer + "?"


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
        t = torch.tensor([count], device=next(ctx.model.parameters()).device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        count = int(t.item())
    if count == 0:
        return []
    padded = idx + [idx[0] if idx else 0] * (count - len(idx))
    return _sample(ctx, [exs[i] for i in padded], n, step, [positions[i] for i in padded])[: len(idx)]


def _sampler_logp_grid(completions, batch) -> torch.Tensor:
    """Sampler log-probs laid out like batch['labels'] (0 elsewhere)."""
    grid = torch.zeros(batch["labels"].shape)
    for b, c in enumerate(completions):
        start = int(batch["prompt_lengths"][b]) - 1
        grid[b, start : start + len(c.token_ids)] = torch.tensor(c.logprobs)
    return grid


@torch.no_grad()
def _rollout(ctx: StageContext, index: int) -> dict:
    """One rollout batch: batch_size * updates_per_rollout prompts x group_size samples, rewards,
    group advantages, the sampler's log-probs, and the old log-probs of the policy that sampled them:
    recomputed by the trainer when several updates share the rollout (so the ratio is exactly 1 at the
    first update); with one update per rollout none (the update's own log-probs, detached, are exactly
    those: no extra pass)."""
    s = ctx.stage
    exs, positions = _rollout_examples(ctx, index)
    groups = _sample(ctx, exs, s.group_size, index, positions)
    flat = [c for g in groups for c in g]
    rep = [e for e in exs for _ in range(s.group_size)]
    scores = [score(c.text, e.answer, e.choices) for c, e in zip(flat, rep)]
    rewards = torch.tensor([x.reward for x in scores])
    if s.advantage_scale == "batch":  # the spread of the whole rollout batch, every rank's groups
        rank, size = world()
        every = gathered_rows(rewards.to(_device(ctx))).cpu()
        adv = group_advantages(every, s.group_size, scale="batch").view(size, -1)[rank]
    else:  # a group lives on one rank: its own rewards are all it needs
        adv = group_advantages(rewards, s.group_size, scale=s.advantage_scale)
    b = collate_token_responses(ctx.processor, [e.problem for e in rep], [e.images for e in rep],
                                [c.token_ids for c in flat])
    labels = b["labels"]
    # in slices of exactly the update's rows: no recompute is larger than an update, and the first
    # update's forward repeats its slice's computation, so its ratio is exactly 1
    slices = _row_slices(len(flat), forward_rows(ctx))

    def logp_of(model):
        return torch.cat([head_token_stats(model, trunk_hidden(model, **_rows(b, sl)), labels[sl],
                                           temperature=s.temperature, outputs=("logp",)).logp for sl in slices])

    with ctx.timer("logprobs"):
        old = logp_of(ctx.model) if s.updates_per_rollout > 1 else None
        ref = logp_of(ctx.reference) if ctx.reference is not None and s.kl_coef > 0 else None
    return {"index": index, "batch": b, "adv": adv, "old": old, "ref": ref, "rewards": rewards, "scores": scores,
            "token_ids": [c.token_ids for c in flat], "sampler": _sampler_logp_grid(flat, b),
            "truncated": torch.tensor([c.finish_reason == "length" for c in flat], dtype=torch.float32)}


def _rollout_examples(ctx: StageContext, index: int) -> tuple[list, list[int]]:
    """This rank's slice of each of rollout `index`'s update minibatches, in update order, and their
    places in the global rollout batch."""
    s = ctx.stage
    return batch_examples(ctx, index, s.batch_size * s.updates_per_rollout, s.updates_per_rollout)


def rollout_state(ctx: StageContext) -> dict | None:
    """What a checkpoint taken inside a rollout batch keeps of it: the sampled tokens, rewards and
    old/reference log-probs, the policy that sampled them being gone by then (the batch itself is
    re-collated from the tokens on resume). None when no rollout is in progress."""
    ro = ctx.extra.get("rollout")
    if ro is None:
        return None
    keep = ("index", "adv", "old", "ref", "rewards", "token_ids", "sampler", "truncated")
    return {**{k: ro[k] for k in keep}, "scores": [dataclasses.asdict(x) for x in ro["scores"]]}


def restore_rollout(ctx: StageContext, state: dict) -> None:
    """Continue inside a rollout batch exactly where a checkpoint left it."""
    s = ctx.stage
    rep = [e for e in _rollout_examples(ctx, state["index"])[0] for _ in range(s.group_size)]
    batch = collate_token_responses(ctx.processor, [e.problem for e in rep], [e.images for e in rep],
                                    state["token_ids"])
    ctx.extra["rollout"] = {**state, "batch": batch, "scores": [Reward(**x) for x in state["scores"]]}


def _row_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def even_row_slices(n: int, parts: int) -> list[slice]:
    """n rows in `parts` consecutive slices whose sizes differ by one at most (the larger first)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _rows(batch: dict, sl: slice) -> dict:
    """Rows `sl` of a collated batch (pixel_values are per image patch: sliced through image_grid_thw)."""
    out = {k: v[sl] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in batch:
        patches = batch["image_grid_thw"].prod(-1)
        start = int(patches[: sl.start].sum())
        stop = start + int(patches[sl].sum())
        out["image_grid_thw"] = batch["image_grid_thw"][sl]
        out["pixel_values"] = batch["pixel_values"][start:stop]
    return out


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
    return _grpo_update(ctx, ro, slice(part * rows, (part + 1) * rows))


# token means combine weighted by tokens; extremes by min / max
_TOKEN_MEAN_METRICS = ("entropy", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "sampler_mismatch",
                       "tis_weight_mean", "tis_truncated_frac")


def _grpo_update(ctx: StageContext, ro: dict, update: slice):
    """The update on rows `update` of the rollout batch, in micro_batches_per_step micro-batches: yields each
    micro-batch's share of the update's loss (the token mean divides by the whole update's tokens; the
    per-sequence means weigh a micro-batch by its rows, so uneven ones add up too), with the update's metrics on
    the last one."""
    s = ctx.stage
    whole = _rows(ro["batch"], update)
    rows = whole["labels"].shape[0]
    n = rank_share_of_tokens(whole["labels"], _device(ctx)) if s.aggregation == "token-mean" else None
    parts = []  # (metrics, tokens, rows) per micro-batch
    for micro in even_row_slices(rows, micro_batches_per_step(s, world()[1])):
        sl = slice(update.start + micro.start, update.start + micro.stop)
        loss, m, labels = _grpo_forward(ctx, ro, sl, n)
        if n is None:  # a per-sequence mean over this micro-batch: its share of the update's mean
            loss = loss * (labels.shape[0] / rows)
        parts.append((m, (labels != -100).sum().item(), labels.shape[0]))
        if micro.stop == rows:  # the trainer combines the ranks' token means weighted by their tokens
            ctx.extra["metric_tokens"] = float(sum(t for _, t, _ in parts))
            ctx.extra["token_weighted"] = _TOKEN_MEAN_METRICS + (("pg_loss",) if s.aggregation == "token-mean" else ())
        yield loss, (_grpo_metrics(ro, update, whole, parts, s.aggregation) if micro.stop == rows else None)


def _grpo_forward(ctx: StageContext, ro: dict, sl: slice, n):
    """GRPO's loss on rows `sl` of the rollout batch (token means over n tokens when given): (loss, metrics,
    labels)."""
    s = ctx.stage
    b = _rows(ro["batch"], sl)
    labels = b["labels"]
    ref = None if ro["ref"] is None else ro["ref"][sl]
    old = None if ro["old"] is None else ro["old"][sl]  # None: on-policy, the update's own log-probs

    def loss_fn(h, w):
        return grpo_loss(h, w, labels, old, ro["adv"][sl], ref_logp=ref, clip_low=s.clip_low,
                         clip_high=s.clip_high, dual_clip=s.dual_clip, kl_coef=s.kl_coef,
                         entropy_coef=s.entropy_coef, aggregation=s.aggregation, temperature=s.temperature,
                         num_items_in_batch=n, sampler_logp=ro["sampler"][sl], tis_cap=s.tis_cap)

    loss, m = _policy_loss(ctx, b, loss_fn)
    return loss, m, labels


def _grpo_metrics(ro: dict, update: slice, whole: dict, parts: list, aggregation: str) -> dict:
    """The update's metrics from its micro-batches' (token means weighted by tokens, pg_loss as aggregated)
    and the rollout's rewards of its rows."""
    device = parts[0][0]["entropy"].device  # the loss's metrics live where the model does
    tokens = torch.tensor([t for _, t, _ in parts], dtype=torch.float64, device=device)
    rows = torch.tensor([r for _, _, r in parts], dtype=torch.float64, device=device)

    def weighted(key, w):
        return (torch.stack([m[key].double() for m, _, _ in parts]) * w).sum() / w.sum().clamp(min=1)

    m = {k: weighted(k, tokens).float() for k in _TOKEN_MEAN_METRICS if k in parts[0][0]}
    m["pg_loss"] = weighted("pg_loss", tokens if aggregation == "token-mean" else rows).float()
    m["ratio_min"] = torch.stack([p["ratio_min"] for p, _, _ in parts]).min()
    m["ratio_max"] = torch.stack([p["ratio_max"] for p, _, _ in parts]).max()
    scores = ro["scores"][update]
    m["reward"] = ro["rewards"][update].mean()
    m["truncated"] = ro["truncated"][update].mean()  # completions that ran out of max_new_tokens
    m["accuracy"] = torch.tensor(sum(x.accuracy for x in scores) / len(scores))
    m["format"] = torch.tensor(sum(x.format for x in scores) / len(scores))
    m["response_tokens"] = (whole["labels"] != -100).sum(1).float().mean()
    return m


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


def _preference_batch(ctx, exs, positions, step):
    """Chosen = the gold target; rejected = with probability on_policy_fraction one of the policy's own wrong
    samples, whole and as sampled (its token ids: its reasoning, not the gold one with its answer pasted in),
    when one of its 4 samples is wrong; else a dataset negative in the gold template."""
    s = ctx.stage
    tok = ctx.processor.tokenizer
    rngs = example_rngs(ctx, step, positions)
    on_policy = [rng.random() < s.on_policy_fraction for rng in rngs]
    rejected: list[list[int] | None] = [None] * len(exs)
    idx = [i for i, flag in enumerate(on_policy) if flag]
    for i, g in zip(idx, _sample_subset(ctx, exs, positions, idx, 4, step)):
        wrong = next((c for c in g if not score(c.text, exs[i].answer, exs[i].choices).accuracy), None)
        if wrong is not None and wrong.token_ids:
            rejected[i] = list(wrong.token_ids)
    n_on = sum(r is not None for r in rejected)
    rejected = [r if r is not None else
                tok(_target(ctx, _dataset_negative(e, rng), e) + END_OF_TURN, add_special_tokens=False)["input_ids"]
                for r, e, rng in zip(rejected, exs, rngs)]
    chosen = [_target_ids(ctx, e) for e in exs]
    problems = [e.problem for e in exs] * 2
    images = [e.images for e in exs] * 2
    return collate_token_responses(ctx.processor, problems, images, chosen + rejected), n_on / len(exs)


def dpo_step(ctx: StageContext, step: int):
    s = ctx.stage
    exs, positions = batch_examples(ctx, step, s.batch_size)
    b, on_policy_share = _preference_batch(ctx, exs, positions, step)
    B = len(exs)
    with torch.no_grad(), ctx.timer("logprobs"):  # pi_ref: the policy at stage start
        rh = trunk_hidden(ctx.reference, **b)
        r = head_token_stats(ctx.reference, rh, b["labels"], temperature=s.temperature, outputs=("logp",),
                             per_sequence=True)
    ref_c, ref_r = r.seq_logp[:B], r.seq_logp[B:]
    if s.type == "dpo":
        def loss_fn(h, w):
            return dpo_loss(h, w, b["labels"], ref_c, ref_r, beta=s.beta, temperature=s.temperature)
    else:
        def loss_fn(h, w):
            return cw_dpo_loss(h, w, b["labels"], ref_c, ref_r, beta=s.beta, tau_c=s.tau_c, l_floor=ctx.l_floor,
                               temperature=s.temperature)
    loss, m = _policy_loss(ctx, b, loss_fn)
    m["on_policy_negatives"] = torch.tensor(on_policy_share)
    return loss, m


@torch.no_grad()
def auto_l_floor(ctx: StageContext, n: int = 64) -> float:
    """l_floor: auto = mean lbar of the (dataset) negatives under the policy at stage start."""
    rng = random.Random(ctx.cfg.run.seed)
    exs = ctx.train[: min(n, len(ctx.train))]
    out = []
    for i in range(0, len(exs), 16):
        part = exs[i : i + 16]
        b = collate(ctx.processor, [e.problem for e in part], [e.images for e in part],
                    [_target(ctx, _dataset_negative(e, rng), e) for e in part])
        hidden = trunk_hidden(ctx.model, **b)
        r = head_token_stats(ctx.model, hidden, b["labels"], outputs=("logp",), per_sequence=True)
        out += sequence_mean(r.seq_logp, r.seq_count).tolist()
    return sum(out) / len(out)


STEP_FUNCTIONS = {"sft": sft_step, "opd": opd_step, "grpo": grpo_step, "dpo": dpo_step, "cw_dpo": dpo_step}
