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
