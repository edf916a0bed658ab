"""Rewards as plugins (vlmfast/reward_plugins.py) and the built-in reward functions (vlmfast/rewards.py): the
weighted sum as TRL forms it (None: no reward from that function, nansum), errors that name the function and the
example, a process pool that gives the in-process values, recipe checks, and a GRPO recipe with GSPO and two
rewards, one from a module outside vlmfast, training the tiny model."""

import json
import math
import os

import pytest
import torch

from vlmfast import rewards as R
from vlmfast.reward_plugins import RewardError, reward_fns, score_batch

GOOD = "<think>count</think> \\boxed{4}"


def test_builtin_rewards():
    assert R.accuracy([GOOD, "<think>x</think> \\boxed{5}", "4"], ["4", "4", "4"]) == [1.0, 0.0, 0.0]
    assert R.format([GOOD, "\\boxed{4}", "<think>a</think> \\boxed{}"]) == [1.0, 0.0, 0.0]
    mc = ["<think>t</think> \\boxed{B}", "<think>t</think> \\boxed{(c)}", GOOD]
    assert R.choice_letter(mc, ["B", "red", "4"], [["red", "blue"], ["a", "b", "red"], None]) == [1.0, 1.0, None]
    nums = ["<think>t</think> \\boxed{3.14}", "<think>t</think> \\boxed{\\frac{1}{3}}", "<think>t</think> \\boxed{7}",
            GOOD]
    assert R.numeric(nums, ["3.1416", "0.3333", "7.5", "red"]) == [1.0, 1.0, 0.0, None]
    assert R.numeric(nums[2:3], ["7.5"], tolerance=0.1) == [1.0]
    assert R.length_penalty([[1] * 8, [], [1] * 32], max_new_tokens=32) == [-0.25, 0.0, -1.0]
    boxes = ["<think>t</think> \\boxed{[0, 0, 10, 10]}", "<think>t</think> \\boxed{[5, 5, 15, 15]}",
             "<think>t</think> \\boxed{left}", GOOD]
    got = R.grounding_iou(boxes, ["[0,0,10,10]", "[0, 0, 10, 10]", "[0, 0, 10, 10]", "4"])
    assert got[0] == 1.0 and got[1] == pytest.approx(25 / 175) and got[2] == 0.0 and got[3] is None


def test_the_weighted_sum_is_trls_and_each_function_is_its_own():
    """TRL: rewards_per_func with NaN where a function gave None, then (rewards_per_func * weights).nansum(dim=1)."""
    fns = reward_fns([{"fn": "vlmfast.rewards:accuracy", "weight": 0.7}, {"fn": "vlmfast.rewards:numeric",
                                                                          "weight": 0.5, "args": {"tolerance": 0.2}},
                      {"fn": "vlmfast.rewards:format", "weight": 0.1}])
    completions = [GOOD, "<think>t</think> \\boxed{4.5}", "\\boxed{red}", "<think>t</think> \\boxed{blue}"]
    cols = {"completions": completions, "answer": ["4", "4", "red", "blue"], "choices": [None] * 4,
            "prompts": ["p"] * 4, "completion_ids": [[1]] * 4, "max_new_tokens": 8}
    total, parts = score_batch(fns, cols, ["a", "b", "c", "d"])
    per_func = torch.tensor([[math.nan if v is None else v for v in parts[f.name]] for f in fns]).T
    want = (per_func * torch.tensor([f.weight for f in fns])).nansum(dim=1)
    assert total == pytest.approx(want.tolist())
    assert parts["numeric"] == [1.0, 1.0, None, None] and parts["accuracy"] == [1.0, 0.0, 1.0, 1.0]


def _module(tmp_path, monkeypatch, body):
    (tmp_path / "user_rewards.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("user_rewards", None)
    importlib.invalidate_caches()


def test_errors_name_the_function_and_the_example(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "def picky(completions, answer, **_):\n"
                                   "    return [1 / (a != 'zero') for a in answer]\n"
                                   "def short(completions, **_):\n    return [1.0]\n"
                                   "def nan(completions, **_):\n    return [float('nan')] * len(completions)\n")
    cols = {"completions": ["x", "y", "z"], "answer": ["one", "zero", "two"]}
    with pytest.raises(RewardError, match=r"reward user_rewards:picky failed on example ex-1: ZeroDivisionError"):
        score_batch(reward_fns([{"fn": "user_rewards:picky"}]), cols, ["ex-0", "ex-1", "ex-2"])
    with pytest.raises(RewardError, match=r"user_rewards:short returned 1 values for 3 completions"):
        score_batch(reward_fns([{"fn": "user_rewards:short"}]), cols, ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"user_rewards:nan returned nan for example a: expected a finite number"):
        score_batch(reward_fns([{"fn": "user_rewards:nan"}]), cols, ["a", "b", "c"])


def test_a_process_pool_gives_the_in_process_values(tmp_path, monkeypatch):
    meet = tmp_path / "meet"  # each pooled call waits (at most 60 s) until two processes have called: the two
    meet.mkdir()  # halves then run in two workers, however late the second one starts on a loaded machine
    _module(tmp_path, monkeypatch, "import os, time\n"
                                   "def slow(completions, answer, **_):\n"
                                   "    return [float(len(c) * 10 + int(a)) for c, a in zip(completions, answer)]\n"
                                   "def pid(completions, **_):\n"
                                   "    if os.getpid() != PARENT:\n"
                                   "        open(os.path.join(MEET, str(os.getpid())), 'w').close()\n"
                                   "        deadline = time.time() + 60\n"
                                   "        while len(os.listdir(MEET)) < 2 and time.time() < deadline:\n"
                                   "            time.sleep(0.05)\n"
                                   "    return [float(os.getpid())] * len(completions)\n"
                                   f"PARENT, MEET = {os.getpid()}, {str(meet)!r}\n")
    cols = {"completions": ["a", "bb", "ccc", "dddd", "eeeee"], "answer": ["1", "2", "3", "4", "5"]}
    fns = reward_fns([{"fn": "user_rewards:slow"}, {"fn": "user_rewards:pid", "weight": 0.0}])
    ids = list("abcde")
    (alone, a_parts), (pooled, p_parts) = score_batch(fns, cols, ids), score_batch(fns, cols, ids, workers=2)
    assert alone == pooled == [11.0, 22.0, 33.0, 44.0, 55.0]
    pids = set(p_parts["pid"])
    assert len(pids) == 2 and os.getpid() not in pids and set(a_parts["pid"]) == {float(os.getpid())}


@pytest.mark.parametrize("rewards,match", [
    ([{"fn": "no_such_module:f"}], r"stages\[0\]\.rewards\[0\]\.fn: No module named 'no_such_module'"),
    ([{"fn": "vlmfast.rewards:nope"}], r"rewards\[0\]\.fn: vlmfast.rewards has no function 'nope'"),
    ([{"fn": "vlmfast.rewards"}], r"rewards\[0\]\.fn: 'vlmfast.rewards' is not \"module:function\""),
    ([{"fn": "vlmfast.rewards:accuracy", "wieght": 1}], r"rewards\[0\]: must be \{fn"),
    ([{"fn": "vlmfast.rewards:accuracy"}, {"fn": "vlmfast.rewards:accuracy"}], r"rewards\[1\]\.fn: two reward"),
    ([], r"rewards: must be a non-empty list"),
])
def test_bad_reward_lists_are_named(rewards, match):
    from vlmfast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(raw={"data": {"synthetic": {}}, "stages": [{"type": "grpo", "rewards": rewards}]})


@pytest.mark.slow
def test_a_recipe_with_gspo_and_a_reward_from_outside_vlmfast_trains(tmp_path, monkeypatch):
    from test_train import recipe, records

    from vlmfast.train import run

    _module(tmp_path, monkeypatch, "def brevity(completion_ids, max_new_tokens, **_):\n"
                                   "    return [1.0 - len(ids) / max_new_tokens for ids in completion_ids]\n")
    grpo = {"type": "grpo", "name": "grpo", "steps": 3, "lr": 2e-3, "batch_size": 2, "group_size": 4,
            "max_new_tokens": 8, "loss_type": "gspo", "temperature": 1.2,
            "rewards": [{"fn": "vlmfast.rewards:accuracy", "weight": 1.0}, {"fn": "user_rewards:brevity",
                                                                             "weight": 0.5}]}
    run(recipe(tmp_path, [grpo], eval={"at_start": False, "probes": 0}))
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:  # each function logged on its own; the reward is their weighted sum
        assert 0 <= r["reward/brevity"] <= 1 and r["reward/accuracy"] == r["accuracy"]
        assert r["reward"] == pytest.approx(r["reward/accuracy"] + 0.5 * r["reward/brevity"], abs=1e-5)
    saved = json.loads((tmp_path / "t" / "recipe.json").read_text())
    assert saved["recipe"]["stages"][0]["rewards"][1]["fn"] == "user_rewards:brevity"
