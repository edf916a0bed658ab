"""What differs between stages: how a step's batch and loss are made. One small function per stage
type; the loop in train.py shares everything else.

Each `*_step(ctx, step)` returns (loss, metrics) for the policy `ctx.model`; the loss is computed
through `call_head` (the fused op as the lm_head's forward: ZeRO-3 safe) and never sees full logits.
Data order and sampling seeds are functions of (run seed, stage index, step), so a resumed run sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .data.collate import END_OF_TURN, collate, collate_token_responses
from .data.prompts import reasoning_of, target_response
from .losses import cw_dpo_loss, dpo_loss, group_advantages, grpo_loss, opd_loss, sft_gentle_negatives_loss, sft_loss
from .models import call_head, trunk_hidden
from .ops import sequence_mean, token_stats
from .rewards import extract_answer, is_correct, score
from .rollout import Sampling, mismatch


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


def step_seed(ctx: StageContext, step: int) -> int:
    return (ctx.cfg.run.seed * 1_000_003 + ctx.index * 10_007 + step) % (2**31 - 1)


def world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batch_examples(ctx: StageContext, step: int, n: int) -> list:
    """This rank's share of the step's global batch of n examples (n / world_size each): the same
    global batch whatever the number of ranks, so 2 ranks match 1 process."""
    rank, size = world()
    if n % size:
        raise ValueError(f"stages[{ctx.index}].batch_size={n} is not divisible by the {size} ranks")
    g = torch.Generator().manual_seed(step_seed(ctx, step))
    idx = torch.randint(len(ctx.train), (n,), generator=g).tolist()
    per = n // size
    return [ctx.train[i] for i in idx[rank * per : (rank + 1) * per]]


def prompt_seeds(ctx: StageContext, step: int, count: int) -> list[int]:
    """Sampling seeds of this rank's prompts, by their place in the global batch: rollouts do not
    depend on how many ranks share the batch."""
    rank, size = world()
    base = step_seed(ctx, step) * 7919
    return [(base + rank * count + j) % (2**31 - 1) for j in range(count)]


def _counted(batch: dict, ctx: StageContext) -> dict:
    """The batch, its tokens counted for the tokens/s metric of the policy's step."""
    ctx.extra["tokens"] = ctx.extra.get("tokens", 0) + int(batch["attention_mask"].sum())
    return batch


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
    exs = batch_examples(ctx, step, s.batch_size)
    b = collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs],
                [_target(ctx, e.answer, e) for e in exs])
    hidden = trunk_hidden(ctx.model, **_counted(b, ctx))  # [B, T, H]
    if s.gentle is None:
        return call_head(ctx.model, hidden, lambda h, w: sft_loss(h, w, b["labels"], temperature=s.temperature,
                                                                  label_smoothing=s.label_smoothing))
    rng = random.Random(step_seed(ctx, step))
    nb = collate(ctx.processor, [e.problem for e in exs], [e.images for e in exs],
                 [_target(ctx, _dataset_negative(e, rng), e) for e in exs])
    neg_hidden = trunk_hidden(ctx.model, **_counted(nb, ctx))
    return call_head(ctx.model, hidden, lambda h, w: sft_gentle_negatives_loss(
        h, w, b["labels"], neg_hidden, nb["labels"], temperature=s.temperature, **s.gentle))


def _sample(ctx, exs, n, step, *, of: int | None = None, positions: list[int] | None = None):
    """n samples per example; `positions` in a batch of `of` examples pick the seeds of a subset."""
    s = ctx.stage
    seeds = prompt_seeds(ctx, step, of or len(exs))
    if positions is not None:
        seeds = [seeds[i] for i in positions]
    return ctx.engine.generate([e.problem for e in exs], [e.images for e in exs], n=n,
                               sampling=Sampling(temperature=s.temperature, max_new_tokens=s.max_new_tokens),
                               seeds=seeds)


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
    group advantages, and the old log-probs of the policy that sampled them (recomputed by the
    trainer, so the ratio is exactly 1 at the first update and the sampler mismatch is measured)."""
    s = ctx.stage
    exs = batch_examples(ctx, index, s.batch_size * s.updates_per_rollout)
    groups = _sample(ctx, exs, s.group_size, index)
    flat = [c for g in groups for c in g]
    rep = [e for e in exs for _ in range(s.group_size)]
    scores = [score(c.text, e.answer, e.choices) for c, e in zip(flat, rep)]
    rewards = torch.tensor([x.reward for x in scores])
    adv = group_advantages(rewards, s.group_size, scale=s.advantage_scale)
    b = collate_token_responses(ctx.processor, [e.problem for e in rep], [e.images for e in rep],
                                [c.token_ids for c in flat])
    labels = b["labels"]
    old = torch.cat([token_stats(trunk_hidden(ctx.model, **_rows(b, sl)), ctx.model.lm_head.weight,
                                 labels[sl], temperature=s.temperature, outputs=("logp",)).logp
                     for sl in _row_slices(len(flat), s.batch_size * s.group_size)])
    ref = None
    if ctx.reference is not None and s.kl_coef > 0:
        ref = torch.cat([token_stats(trunk_hidden(ctx.reference, **_rows(b, sl)),
                                     ctx.reference.lm_head.weight, labels[sl], temperature=s.temperature,
                                     outputs=("logp",)).logp
                         for sl in _row_slices(len(flat), s.batch_size * s.group_size)])
    mask = labels != -100
    sampler = _sampler_logp_grid(flat, b)
    return {"index": index, "batch": b, "adv": adv, "old": old, "ref": ref, "rewards": rewards, "scores": scores,
            "mismatch": mismatch([sampler[i][mask[i]].tolist() for i in range(len(flat))],
                                 [old[i][mask[i]].tolist() for i in range(len(flat))])}


def _row_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


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
    `updates_per_rollout` steps (later minibatches see ratios != 1: that is where clipping acts)."""
    s = ctx.stage
    index, part = divmod(step, s.updates_per_rollout)
    ro = ctx.extra.get("rollout")
    if ro is None or ro["index"] != index:
        ro = ctx.extra["rollout"] = _rollout(ctx, index)
    mb = s.batch_size // (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    sl = slice(part * mb * s.group_size, (part + 1) * mb * s.group_size)
    b = _rows(ro["batch"], sl)
    labels = b["labels"]
    hidden = trunk_hidden(ctx.model, **_counted(b, ctx))
    ref = None if ro["ref"] is None else ro["ref"][sl]
    loss, m = call_head(ctx.model, hidden, lambda h, w: grpo_loss(
        h, w, labels, ro["old"][sl], ro["adv"][sl], ref_logp=ref, clip_low=s.clip_low, clip_high=s.clip_high,
        dual_clip=s.dual_clip, kl_coef=s.kl_coef, entropy_coef=s.entropy_coef, aggregation=s.aggregation,
        temperature=s.temperature))
    scores = ro["scores"][sl]
    m["sampler_mismatch"] = torch.tensor(ro["mismatch"])
    m["reward"] = ro["rewards"][sl].mean()
    m["accuracy"] = torch.tensor(sum(x.accuracy for x in scores) / len(scores))
    m["format"] = torch.tensor(sum(x.format for x in scores) / len(scores))
    m["response_tokens"] = (labels != -100).sum(1).float().mean()
    return loss, m


def opd_step(ctx: StageContext, step: int):
    s = ctx.stage
    exs = batch_examples(ctx, step, s.batch_size)
    # y ~ pi_student for a share opd_on_policy of the batch; the rest are dataset targets (GKD's mix:
    # from random weights the student's own samples say little until it has learned the format)
    rng = random.Random(step_seed(ctx, step))
    on_policy = [rng.random() < s.opd_on_policy for _ in exs]
    idx = [i for i, flag in enumerate(on_policy) if flag]
    responses = [_target_ids(ctx, e) for e in exs]
    if idx:
        sampled = _sample(ctx, [exs[i] for i in idx], 1, step, of=len(exs), positions=idx)
        for i, g in zip(idx, sampled):
            responses[i] = g[0].token_ids
    b = collate_token_responses(ctx.processor, [e.problem for e in exs], [e.images for e in exs], responses)
    hidden = trunk_hidden(ctx.model, **_counted(b, ctx))
    if s.opd_mode == "full":
        with torch.no_grad():  # the teacher sees exactly the same image and prompt
            th = trunk_hidden(ctx.teacher, **b)
        teacher = (th, ctx.teacher.lm_head.weight.detach())
        loss, m = call_head(ctx.model, hidden, lambda h, w: opd_loss(h, w, b["labels"], teacher=teacher,
                                                                     temperature=s.temperature))
        m["on_policy_share"] = torch.tensor(len(idx) / len(exs))
        return loss, m
    # sampled-token form: the teacher's per-token log-probs come from a generation engine's score()
    # (a teacher too large to sit beside the student would be served there)
    scored = ctx.extra["teacher_engine"].score([e.problem for e in exs], [e.images for e in exs],
                                               responses, temperature=s.temperature)
    t_logp = torch.zeros(b["labels"].shape)
    for i, lp in enumerate(scored):
        start = int(b["prompt_lengths"][i]) - 1
        t_logp[i, start : start + len(lp)] = torch.tensor(lp)
    return call_head(ctx.model, hidden, lambda h, w: opd_loss(h, w, b["labels"], teacher_logp=t_logp,
                                                              temperature=s.temperature))


def _preference_batch(ctx, exs, step):
    """Chosen = the gold answer; rejected = the policy's own wrong answer with probability rho_mix
    (when it produces one), else a dataset negative."""
    s = ctx.stage
    rng = random.Random(step_seed(ctx, step))
    on_policy = [rng.random() < s.on_policy_fraction for _ in exs]
    rejected = [None] * len(exs)
    idx = [i for i, flag in enumerate(on_policy) if flag]
    if idx:
        groups = _sample(ctx, [exs[i] for i in idx], 4, step, of=len(exs), positions=idx)
        for i, g in zip(idx, groups):
            for c in g:
                ans = extract_answer(c.text)
                if ans is not None and not is_correct(ans, exs[i].answer, exs[i].choices):
                    rejected[i] = _target(ctx, ans, exs[i])
                    break
    n_on = sum(r is not None for r in rejected)
    rejected = [r if r is not None else _target(ctx, _dataset_negative(e, rng), e) for r, e in zip(rejected, exs)]
    chosen = [_target(ctx, e.answer, e) for e in exs]
    problems = [e.problem for e in exs] * 2
    images = [e.images for e in exs] * 2
    return collate(ctx.processor, problems, images, chosen + rejected), n_on / len(exs)


def dpo_step(ctx: StageContext, step: int):
    s = ctx.stage
    exs = batch_examples(ctx, step, s.batch_size)
    b, on_policy_share = _preference_batch(ctx, exs, step)
    B = len(exs)
    with torch.no_grad():  # pi_ref: the policy at stage start
        rh = trunk_hidden(ctx.reference, **b)
        r = token_stats(rh, ctx.reference.lm_head.weight, b["labels"], temperature=s.temperature,
                        outputs=("logp",), per_sequence=True)
    ref_c, ref_r = r.seq_logp[:B], r.seq_logp[B:]
    hidden = trunk_hidden(ctx.model, **_counted(b, ctx))
    if s.type == "dpo":
        loss, m = call_head(ctx.model, hidden, lambda h, w: dpo_loss(h, w, b["labels"], ref_c, ref_r, beta=s.beta,
                                                                     temperature=s.temperature))
    else:
        loss, m = call_head(ctx.model, hidden, lambda h, w: cw_dpo_loss(
            h, w, b["labels"], ref_c, ref_r, beta=s.beta, tau_c=s.tau_c, l_floor=ctx.l_floor,
            temperature=s.temperature))
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
        r = token_stats(hidden, ctx.model.lm_head.weight, b["labels"], outputs=("logp",), per_sequence=True)
        out += sequence_mean(r.seq_logp, r.seq_count).tolist()
    return sum(out) / len(out)


STEP_FUNCTIONS = {"sft": sft_step, "opd": opd_step, "grpo": grpo_step, "dpo": dpo_step, "cw_dpo": dpo_step}
