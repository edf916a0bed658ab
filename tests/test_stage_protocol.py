"""The stage protocol (vlmfast/stages/base.py): the trainer, the recipe checks and the plan go through a stage's
Stage and never ask its type, so a new stage type is its own module plus one registry entry."""

import ast
from pathlib import Path

import pytest

import vlmfast.stages as S
from vlmfast.config import ConfigError, load_config
from vlmfast.plan import GiB, plan
from vlmfast.stages.sft import SFT

ROOT = Path(__file__).resolve().parent.parent
LOOP_FILES = ["vlmfast/train.py", "vlmfast/stage_loop.py", "vlmfast/plan.py", "vlmfast/config.py",
              "vlmfast/config_schema.py", "vlmfast/config_checks.py",
              "vlmfast/data/budget.py", "vlmfast/policy.py"]


def _type_tests(path):
    """Places that compare some `x.type` with a string (or a tuple of strings): a stage type asked for."""
    found = []
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "type":
            for right in node.comparators:
                consts = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
                if any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in consts):
                    found.append(f"{path}:{node.lineno}")
    return found


def test_no_stage_type_is_asked_outside_the_stage_modules():
    found = [hit for path in LOOP_FILES for hit in _type_tests(path)]
    assert not found, f"stage types asked outside vlmfast/stages/ (put it behind the Stage protocol): {found}"
    assert _type_tests("vlmfast/stages/preference.py"), "the check finds a type comparison where one is"


def test_every_recipe_type_has_its_stage():
    assert set(S.STAGES) == {"sft", "opd", "grpo", "dpo", "cw_dpo"}
    for name, kind in S.STAGES.items():
        assert name in kind.types and callable(kind.step)


class Toy(SFT):
    """A new stage type: SFT's step with a frozen reference, its own recipe rule and planned rows."""

    types = ("toy",)
    checked = []

    def needs_reference(self, s):
        return True

    def sequences_per_row(self, s):
        return 3

    def check(self, s, key, bad):
        Toy.checked.append(key)
        if s.lr > 0.1:
            bad(f"{key}.lr", "toy stages learn slowly")


def test_a_new_stage_type_reaches_the_checks_and_the_plan_from_its_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(S.STAGES, "toy", Toy())
    raw = {"model": {"path": "tiny:student"}, "data": {"synthetic": {"train": 8, "val": 2, "ood": 2}},
           "stages": [{"type": "sft", "steps": 1}, {"type": "toy", "steps": 1, "lr": 1e-3}]}
    cfg = load_config(raw=raw)
    assert Toy.checked == ["stages[1]"]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr: toy stages learn slowly"):
        load_config(raw={**raw, "stages": [{"type": "toy", "steps": 1, "lr": 0.5}]})
    sft, toy = plan(cfg, gpus=1, gpu_memory=80 * GiB)
    assert "reference engine" in toy.update and "reference engine" not in sft.update
    # three sequences per row: three times SFT's activations at the same batch
    assert toy.update["activations"] == pytest.approx(3 * sft.update["activations"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.type: must be one of .*'toy'"):
        load_config(raw={**raw, "stages": [{"type": "toys", "steps": 1}]})


RANK = """
import json, sys, torch
torch.distributed.init_process_group("gloo")
from types import SimpleNamespace
from vlmfast.stages.grpo_rollout import update_micro_slices
rank = torch.distributed.get_rank()
lengths = [[30, 30, 30, 30, 30, 30], [100, 100, 5, 5, 5, 5]][rank]  # 2 micro-batches of 100 on rank 0, 3 on rank 1
mask = torch.zeros(6, 100, dtype=torch.long)
for i, n in enumerate(lengths):
    mask[i, :n] = 1
ctx = SimpleNamespace(stage=SimpleNamespace(max_tokens_per_micro_batch=100, micro_batch_size=None))
got = update_micro_slices(ctx, {"attention_mask": mask}, slice(0, 6))
print(json.dumps([[s.start, s.stop] for s in got]))
torch.distributed.destroy_process_group()
"""


@pytest.mark.multirank
def test_every_rank_runs_as_many_micro_batches_as_the_rank_with_most(tmp_path):
    """Two ranks whose sequences need 2 and 3 micro-batches under the token budget both run 3: ZeRO-3 gathers
    every layer collectively, so a rank with a forward fewer would hang the other."""
    from _launch import two_rank_script

    zero, one = two_rank_script(RANK, ROOT)
    assert zero == [[0, 1], [1, 3], [3, 6]]  # 3 of 30-token rows make 90: split to match rank 1's count
    assert one == [[0, 1], [1, 2], [2, 6]]
