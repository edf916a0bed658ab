"""GRPO's samples balanced across ranks by length (balance_batch, verl's _balance_batch): the shares, the exchange
on two ranks, and a two-rank run killed inside a balanced rollout that resumes to the uninterrupted run's numbers."""

import itertools
import json
import random
import subprocess
import sys

import pytest
import yaml
from _launch import clean_env, free_port, two_rank_script

from vlmfast.ranks import balanced_shares

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _loads(lengths, shares):
    return [sum(lengths[i] for i in share) for share in shares]


def test_shares_hold_every_row_once_as_many_each():
    lengths = [100, 100, 5, 5, 5, 5]  # rank 0 drew both long samples: 210 tokens against 20
    shares = balanced_shares(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(6)) and [len(s) for s in shares] == [3, 3]
    assert _loads(lengths, shares) == [110, 110]
    assert balanced_shares([5, 100, 5, 100], 2) == [[0, 1], [2, 3]]  # already even: nothing moves
    with pytest.raises(ValueError, match="7 rows do not split into 2 equal shares"):
        balanced_shares([1] * 7, 2)


def test_shares_are_near_the_best_split():
    """Against the best equal-size split found by exhaustive search (small cases), the largest share stays within
    a quarter of the optimum's, and never above the split of the rows as they are (the ranks' own)."""
    rng = random.Random(0)
    for _ in range(300):
        parts, per = rng.choice([(2, 2), (2, 3), (3, 2)])
        n = parts * per
        lengths = [rng.choice([rng.randrange(20, 60), rng.randrange(200, 600)]) for _ in range(n)]
        got = max(_loads(lengths, balanced_shares(lengths, parts)))
        best = min(max(_loads(lengths, [order[k * per:(k + 1) * per] for k in range(parts)]))
                   for order in itertools.permutations(range(n)))
        contiguous = max(sum(lengths[k * per:(k + 1) * per]) for k in range(parts))
        assert best <= got <= min(1.25 * best, contiguous), (lengths, parts)


EXCHANGE = """
import json, torch
torch.distributed.init_process_group("gloo")
from vlmfast.ranks import balanced_rows
rank = torch.distributed.get_rank()
lengths = [[300, 250, 200, 10], [20, 15, 10, 5]][rank]  # rank 0 drew every long sample
rows = [{"origin": [rank, j], "tokens": list(range(n))} for j, n in enumerate(lengths)]
mine = balanced_rows(rows, lengths)
print(json.dumps(mine))
torch.distributed.destroy_process_group()
"""


@pytest.mark.multirank
def test_two_ranks_exchange_rows_to_even_tokens():
    """Each rank ends with as many rows as it had, about as many tokens as the other, every row exactly once with
    its payload intact (the rows that moved travelled whole)."""
    got = two_rank_script(EXCHANGE, ROOT)
    assert [len(rows) for rows in got] == [4, 4]
    assert sorted(tuple(r["origin"]) for rows in got for r in rows) == [(k, j) for k in range(2) for j in range(4)]
    lengths = [[300, 250, 200, 10], [20, 15, 10, 5]]
    for rows in got:
        for r in rows:
            assert r["tokens"] == list(range(lengths[r["origin"][0]][r["origin"][1]]))
    loads = [sum(len(r["tokens"]) for r in rows) for rows in got]
    # before: 760 and 50 tokens. Best possible: the share without 300 holds 250 and 200 (three long rows, two per
    # share at most... one share gets two) and two short rows, at least 250 + 200 + 10 + 5 = 465
    assert max(loads) == 465 and sum(loads) == 810, loads


RECIPE = {
    "run": {"threads": 1, "checkpoint_every": 1, "seed": 3},
    "model": {"path": "tiny:student"},
    "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
    "deepspeed": {"zero_stage": 3, "stage3_param_persistence_threshold": 0},
    "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0,
             "at_start": False},
    "stages": [{"type": "grpo", "name": "grpo", "steps": 4, "lr": 2e-3, "batch_size": 2, "group_size": 4,
                "updates_per_rollout": 2, "max_new_tokens": 16, "temperature": 1.5, "kl_coef": 0.05,
                "max_tokens_per_micro_batch": 150}],
}


def _two_ranks(tmp_path, name, kill_at=None, **stage):
    path = tmp_path / f"{name}.yaml"
    recipe = {**RECIPE, "run": {**RECIPE["run"], "name": name, "out_dir": str(tmp_path)},
              "stages": [{**RECIPE["stages"][0], **stage}]}
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "vlmfast.train", "--config", str(path)]
    env = clean_env(DS_ACCELERATOR="cpu", **({"VLMFAST_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _train_records(tmp_path, name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_balanced_rollouts_train_as_unbalanced_and_resume_inside_a_rollout(tmp_path):
    """Two ZeRO-3 ranks: with balance_batch every update's tokens are more even across the ranks than without, yet
    the losses and metrics are the same (a global token mean does not care which rank holds a sample); a run
    SIGKILLed inside a rollout batch, whose rows now come from the other rank's prompts too, resumes to the
    uninterrupted run's numbers (a checkpoint keeps each sample's prompt place)."""
    for name, kw in (("on", {}), ("off", {"balance_batch": False})):
        res = _two_ranks(tmp_path, name, **kw)
        assert res.returncode == 0, res.stderr[-3000:]
    on, off = _train_records(tmp_path, "on"), _train_records(tmp_path, "off")
    spread = [[r["rank_tokens_max"] / r["rank_tokens"] for r in recs] for recs in (on, off)]
    assert all(a <= b for a, b in zip(*spread)) and sum(spread[0]) < sum(spread[1]), spread
    for a, b in zip(off, on):
        for key in ("loss", "pg_loss", "kl", "entropy", "ratio_mean", "reward", "response_tokens", "rank_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    killed = _two_ranks(tmp_path, "run", kill_at="0:1")  # step 1 of 2 in the first rollout: its rows in the checkpoint
    assert killed.returncode != 0
    assert (tmp_path / "run" / "checkpoints" / "step-0-1").exists()
    resumed = _two_ranks(tmp_path, "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _train_records(tmp_path, "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(on, got):
        for key in ("loss", "ratio_mean", "kl", "rank_tokens_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_every_stage_balances_its_rows_and_trains_the_same(tmp_path):
    """SFT with gentle negatives, OPD (half the responses the student's own samples) and DPO on two ZeRO-3 ranks,
    on data whose targets, negatives and images differ widely in size: with balance_batch the ranks' tokens are
    more even than as drawn, and every step's loss and metrics are the same."""
    from test_train import _ragged_data

    stages = [
        {"type": "sft", "name": "gentle", "gentle": {"variant": "hinge", "lam": 0.5, "margin": 8.0}},
        {"type": "opd", "name": "opd", "teacher": "tiny:teacher", "opd_on_policy": 0.5, "max_new_tokens": 24},
        {"type": "dpo", "name": "dpo", "beta": 0.5, "on_policy_fraction": 0.5, "max_new_tokens": 24},
    ]
    recipe = {**RECIPE, "data": _ragged_data(tmp_path),
              "stages": [{**s, "steps": 3, "lr": 2e-3, "batch_size": 8, "temperature": 1.5} for s in stages]}
    for name, balance in (("on", None), ("off", False)):
        path = tmp_path / f"{name}.yaml"
        run = {**recipe, "run": {**RECIPE["run"], "name": name, "out_dir": str(tmp_path)},
               "stages": [{**s, "balance_batch": balance} for s in recipe["stages"]]}
        path.write_text(yaml.safe_dump(run))
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), "--module", "vlmfast.train", "--config", str(path)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env(DS_ACCELERATOR="cpu"))
        assert res.returncode == 0, res.stderr[-3000:]
    on, off = _train_records(tmp_path, "on"), _train_records(tmp_path, "off")
    assert [(r["stage"], r["step"]) for r in on] == [(r["stage"], r["step"]) for r in off]
    spread = [[r["rank_tokens_max"] / r["rank_tokens"] for r in recs] for recs in (on, off)]
    assert all(a <= b + 1e-9 for a, b in zip(*spread)) and sum(spread[0]) < sum(spread[1]) - 0.05, spread
    for a, b in zip(off, on):
        # DPO's first step has policy = reference: its rewards are float noise and their comparison a coin flip
        noise = ("reward_accuracy",) if a["stage"] == "dpo" and a["step"] == 1 else ()
        for key in set(a) & set(b):
            if isinstance(a[key], float) and key not in ("lr", "tokens_per_s", "peak_mem_mb", "step_time_s",
                                                         "rank_tokens_max", *noise) and "timing" not in key:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=2e-5), (a["stage"], a["step"], key)
