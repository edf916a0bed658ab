"""Rewards as plugins: a GRPO stage lists reward functions by import path with weights,

    rewards: [{fn: "vlmfast.rewards:accuracy", weight: 0.9}, {fn: "mypkg.rewards:fmt", weight: 0.1, args: {k: 1}}]

(default: the two above with vlmfast's format, today's reward). A function takes a batch as keyword lists
(TRL's reward_funcs convention): prompts, completions (texts), completion_ids, answer, choices, every other column
of the dataset rows, and max_new_tokens; it returns one float, or None (no reward for that sample), per completion.
The sample's reward is the weighted sum of the functions that gave one (TRL: `nansum` of rewards x weights); each
function's mean over the samples it scored is logged as reward/<name>. An exception, or an answer of the wrong length
or type, stops the run naming the function and the example. `reward_workers: N` scores in N processes (CPU-heavy
verifiers), the batch split in order.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import importlib
import math
import multiprocessing
from dataclasses import dataclass, field

DEFAULT_REWARDS = ({"fn": "vlmfast.rewards:accuracy", "weight": 0.9}, {"fn": "vlmfast.rewards:format", "weight": 0.1})


class RewardError(RuntimeError):
    """A reward function failed or answered out of contract: names the function and the example."""


@dataclass(frozen=True)
class RewardFn:
    path: str  # "module:function"
    weight: float
    args: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rpartition(":")[2]


def reward_fns(spec: list[dict] | None) -> list[RewardFn]:
    """The stage's `rewards:` list (default DEFAULT_REWARDS) as RewardFns."""
    return [RewardFn(path=r["fn"], weight=float(r.get("weight", 1.0)), args=dict(r.get("args") or {}))
            for r in (spec or DEFAULT_REWARDS)]


def check_spec(spec, bad, key: str) -> None:
    """A recipe's `rewards:` list: each entry {fn: "module:function", weight, args}, importable (bad(key, msg))."""
    if spec is None:
        return
    if not isinstance(spec, list) or not spec:
        bad(key, "must be a non-empty list of {fn: \"module:function\", weight: number}")
    names = set()
    for i, r in enumerate(spec):
        where = f"{key}[{i}]"
        if not isinstance(r, dict) or set(r) - {"fn", "weight", "args"} or "fn" not in r:
            bad(where, f"must be {{fn: \"module:function\", weight: number, args: {{...}}}}, got {r!r}")
        if not isinstance(r.get("weight", 1.0), (int, float)) or not math.isfinite(r.get("weight", 1.0)):
            bad(f"{where}.weight", f"must be a finite number, got {r.get('weight')!r}")
        try:
            load(r["fn"])
        except (ImportError, AttributeError, ValueError) as e:
            bad(f"{where}.fn", str(e))
        name = r["fn"].rpartition(":")[2]
        if name in names:
            bad(f"{where}.fn", f"two reward functions named {name!r}: their logs would mix")
        names.add(name)


def load(path: str):
    """The function at "module:function"."""
    module, sep, name = str(path).partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{path!r} is not \"module:function\"")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise AttributeError(f"{module} has no function {name!r}")
    return fn


def _call(path: str, args: dict, columns: dict) -> list:
    return list(load(path)(**columns, **args))


def _checked(fn: RewardFn, got: list, n: int, ids: list[str]) -> list[float | None]:
    if len(got) != n:
        raise RewardError(f"reward {fn.path} returned {len(got)} values for {n} completions")
    out = []
    for v, ex in zip(got, ids):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise RewardError(f"reward {fn.path} returned {v!r} for example {ex}: expected a finite number or None")
        out.append(None if v is None else float(v))
    return out


_POOLS: dict[int, concurrent.futures.ProcessPoolExecutor] = {}


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """One pool per size for the process's life (spawned: no forked CUDA or collective state), shut down at exit
    (left to the interpreter's teardown, its workers' callbacks find their modules gone)."""
    if workers not in _POOLS:
        if not _POOLS:
            atexit.register(_shutdown_pools)
        _POOLS[workers] = concurrent.futures.ProcessPoolExecutor(workers,
                                                                 mp_context=multiprocessing.get_context("spawn"))
    return _POOLS[workers]


def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown()
    _POOLS.clear()


def _run(fn: RewardFn, columns: dict, n: int, workers: int) -> list:
    if workers <= 1 or n < 2:
        return _call(fn.path, fn.args, columns)
    bounds = [n * k // workers for k in range(workers + 1)]
    parts = [{k: v[a:b] if isinstance(v, list) else v for k, v in columns.items()} for a, b in zip(bounds, bounds[1:])]
    futures = [_pool(workers).submit(_call, fn.path, fn.args, p) for p in parts if p["completions"]]
    return [v for f in futures for v in f.result()]


def score_batch(fns: list[RewardFn], columns: dict, ids: list[str], workers: int = 0
                ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Each completion's reward (the weighted sum of the functions that scored it) and each function's values.
    `columns`: keyword lists, one entry per completion (scalars, such as max_new_tokens, passed as they are)."""
    n = len(columns["completions"])
    values = {}
    for fn in fns:
        try:
            got = _run(fn, columns, n, workers)
        except RewardError:
            raise
        except Exception as e:  # name the example: each alone until one fails
            for i in range(n):
                try:
                    _call(fn.path, fn.args, {k: v[i : i + 1] if isinstance(v, list) else v for k, v in columns.items()})
                except Exception as one:
                    raise RewardError(f"reward {fn.path} failed on example {ids[i]}: {type(one).__name__}: {one}"
                                      ) from one
            raise RewardError(f"reward {fn.path} failed on a batch of {n}: {type(e).__name__}: {e}") from e
        values[fn.name] = _checked(fn, got, n, ids)
    # a completion no function scored is NaN, not 0 (TRL's "unscorable"): 0 would bias its group's baseline and
    # hand it an advantage; group_advantages leaves it out and gives it 0
    total = [sum(fn.weight * values[fn.name][i] for fn in fns if values[fn.name][i] is not None)
             if any(values[fn.name][i] is not None for fn in fns) else float("nan") for i in range(n)]
    return total, values
