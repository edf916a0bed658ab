"""What every rank's share adds up to: sums, extremes and means over the data-parallel ranks, and results
gathered back into one order. Each is the identity in one process, so a record is the same on 1 rank or 64."""

from __future__ import annotations

import torch


def several_ranks() -> bool:
    """More than one rank in this run's world (collectives do something)."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def is_main() -> bool:
    """Rank 0, or a process without a world: the one that writes shared files."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def from_rank0(value):
    """Rank 0's `value` on every rank (a collective: every rank calls it; the identity without a world)."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device(x: torch.Tensor) -> torch.device:
    """Where a collective can take x: NCCL reduces GPU tensors only (the current device's), gloo any."""
    if x.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def reduce_over_ranks(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x summed (op "sum"), or its elementwise max / min, over the ranks; a copy on x's device, no gradient."""
    x = x.detach().clone()
    if several_ranks():
        ops = torch.distributed.ReduceOp
        y = x.to(_collective_device(x))
        torch.distributed.all_reduce(y, op={"sum": ops.SUM, "max": ops.MAX, "min": ops.MIN}[op])
        x = y.to(x.device)
    return x


def gathered_in_order(mine: list, places: list[int], n: int) -> list:
    """Every rank's results (mine[j] belongs at place places[j]) put back in the order of the n places."""
    parts = [(places, mine)]
    if several_ranks():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (places, mine))
    out = [None] * n
    for where, results in parts:
        for p, r in zip(where, results):
            out[p] = r
    return out


def gathered_dict(mine: dict) -> dict:
    """Every rank's {key: value} in one dict (keys unique across ranks); `mine` in one process."""
    if not several_ranks():
        return dict(mine)
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def gathered_rows(x: torch.Tensor) -> torch.Tensor:
    """[rows, ...] of every rank (each the same number of rows) concatenated in rank order."""
    if not several_ranks():
        return x
    y = x.contiguous().to(_collective_device(x))
    parts = [torch.empty_like(y) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def balanced_shares(lengths: list[int], parts: int) -> list[list[int]]:
    """The indices of `lengths` in `parts` shares of as many rows each, their token sums as even as a greedy makes
    them: longest row first, each to the share with the fewest tokens that has room (LPT; verl's _balance_batch
    does the same with Karmarkar-Karp), or the rows as they are split (consecutive shares) when that is as even:
    never worse than not balancing, and nothing moves for nothing. Deterministic: every rank computes the same
    shares from the same lengths."""
    if len(lengths) % parts:
        raise ValueError(f"{len(lengths)} rows do not split into {parts} equal shares")
    per = len(lengths) // parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min((k for k in range(parts) if len(shares[k]) < per), key=lambda k: (load[k], k))
        shares[k].append(i)
        load[k] += lengths[i]
    as_they_are = [list(range(k * per, (k + 1) * per)) for k in range(parts)]
    if max(sum(lengths[i] for i in share) for share in as_they_are) <= max(load):
        return as_they_are
    return [sorted(share) for share in shares]


def routed(mine: dict, owner: dict) -> dict:
    """Items keyed by a global key, each sent to its rank (owner[key]; a key without one is dropped): this rank's
    items after the exchange, its own that stay and the others' that arrive. Only items that change rank travel
    (one all_gather_object). In one process: the items owned by rank 0."""
    rank = torch.distributed.get_rank() if several_ranks() else 0
    out = {k: v for k, v in mine.items() if owner.get(k) == rank}
    if several_ranks():
        sent = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(sent, {k: v for k, v in mine.items() if owner.get(k) not in (None, rank)})
        for part in sent:
            out.update({k: v for k, v in part.items() if owner[k] == rank})
    return out


def balanced_rows(rows: list, lengths: list[int]) -> list:
    """Every rank's `rows` (as many on each; `lengths`: their tokens) redistributed so that each rank holds as many
    rows and about as many tokens (balanced_shares over the ranks' rows in rank order): this rank's new rows, in
    that order. Only rows that change rank travel. The identity in one process."""
    if not several_ranks():
        return rows
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    every = [None] * world
    torch.distributed.all_gather_object(every, lengths)
    flat = [n for part in every for n in part]
    owner = {}  # the rank each global row goes to
    for k, share in enumerate(balanced_shares(flat, world)):
        owner.update(dict.fromkeys(share, k))
    start = sum(len(part) for part in every[:rank])
    mine = routed(dict(enumerate(rows, start)), owner)
    return [mine[i] for i in sorted(mine)]


def global_means(metrics: dict, weights: dict | None = None) -> dict:
    """A step's metrics (floats) over all ranks: a metric named in `weights` is a mean over this rank's
    weights[name] items (its tokens, its pushed negatives, ...) and combines weighted by them; *_min / *_max take
    the extreme; every other one is a mean over rows, each rank holding as many (the batch splits evenly), so the
    global mean is the mean of the ranks'. One all-reduce per kind."""
    if not several_ranks():
        return dict(metrics)
    weights = weights or {}
    keys = sorted(metrics)
    lows = [k for k in keys if k.endswith("_min")]
    highs = [k for k in keys if k.endswith("_max")]
    means = [k for k in keys if k not in lows and k not in highs]
    w = [float(weights.get(k, 1.0)) for k in means]
    sums = reduce_over_ranks(torch.tensor([metrics[k] * x for k, x in zip(means, w)] + w, dtype=torch.float64))
    out = {k: sums[i].item() / sums[len(means) + i].item() if sums[len(means) + i] else 0.0
           for i, k in enumerate(means)}
    if lows:
        out.update(zip(lows, reduce_over_ranks(torch.tensor([metrics[k] for k in lows], dtype=torch.float64),
                                               "min").tolist()))
    if highs:
        out.update(zip(highs, reduce_over_ranks(torch.tensor([metrics[k] for k in highs], dtype=torch.float64),
                                                "max").tolist()))
    return out


def shard(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's places among n problems (every world-th, from its rank), padded by repeating one of them to
    ceil(n / world), and how many are real: every rank runs as many generations and forwards (under ZeRO-3
    each is a collective), and the padding's results are dropped."""
    mine = list(range(rank, n, world))
    size = -(-n // world)
    return mine + [mine[0] if mine else 0] * (size - len(mine)), len(mine)
