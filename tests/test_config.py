"""Recipes: unknown keys, wrong types, missing files and impossible settings fail before training,
naming the key; overrides apply."""

import pytest

from vlmfast.config import ConfigError, load_config

BASE = {"data": {"synthetic": {"train": 10, "val": 4, "ood": 4}}, "stages": [{"type": "sft", "steps": 2}]}


def cfg(**over):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw["stages"] = [dict(s) for s in BASE["stages"]]
    for k, v in over.items():
        raw[k] = v
    return raw


def test_valid_recipe_and_overrides():
    c = load_config(raw=cfg(), overrides=["stages.0.lr=1e-4", "run.name=x", "eval.k=[1, 2]"])
    assert c.stages[0].lr == 1e-4 and c.run.name == "x" and c.eval.k == [1, 2]


def test_shipped_recipes_load():
    from pathlib import Path

    import yaml

    from vlmfast.study import load_study

    paths = sorted(Path(__file__).resolve().parent.parent.glob("recipes/*.yaml"))
    studies = [p for p in paths if "study" in (yaml.safe_load(p.read_text()) or {})]
    assert studies, "the study recipe (make demo) is shipped"
    for path in paths:
        load_study(path) if path in studies else load_config(path)


@pytest.mark.parametrize(
    "raw,match",
    [
        (cfg(run={"nmae": "x"}), r"run: unknown key\(s\) \['nmae'\]"),
        (cfg(stages=[{"type": "sft", "stepz": 3}]), r"stages\[0\]: unknown key\(s\) \['stepz'\]"),
        (cfg(stages=[{"type": "ppo"}]), r"stages\[0\].type: must be one of"),
        (cfg(stages=[{"type": "grpo", "group_size": 1}]), r"stages\[0\].group_size: GRPO needs >= 2"),
        (cfg(stages=[{"type": "sft", "lr": "fast"}]), r"stages\[0\].lr: expected a number"),
        (cfg(stages=[{"type": "opd"}]), r"stages\[0\].teacher: opd needs a teacher"),
        (cfg(stages=[{"type": "opd", "teacher": "/no/such/teacher"}]),
         r"stages\[0\].teacher: /no/such/teacher not found"),
        (cfg(stages=[{"type": "cw_dpo", "l_floor": "low"}]), r"stages\[0\].l_floor"),
        (cfg(stages=[{"type": "sft", "gentle": {"lamda": 1}}]), r"stages\[0\].gentle: unknown key"),
        (cfg(stages=[]), "at least one stage"),
        (cfg(data={"train": "/no/such.parquet"}), "data.train: /no/such.parquet not found"),
        (cfg(data={}), "data: give data.synthetic or data.train"),
        (cfg(eval={"n_samples": 2, "k": [1, 4]}), "eval.k"),
        (cfg(model={"path": "tiny:giant"}), "model.path: tiny models"),
        (cfg(deepspeed={"zero_stage": 4}), "deepspeed.zero_stage"),
        (cfg(data={"synthetic": {"question_types": ["count_all", "shade"]}}),
         r"data.synthetic.question_types: \['shade'\]"),
        (cfg(data={"synthetic": {"size_range": [0.3, 0.1]}}), "data.synthetic.size_range"),
        (cfg(data={"synthetic": {"max_shapes": 0}}), "data.synthetic.max_shapes"),
        (cfg(stages=[{"type": "opd", "teacher": "tiny:teacher", "opd_on_policy": 1.5}]), r"stages\[0\].opd_on_policy"),
        (cfg(stages=[{"type": "opd", "teacher": "tiny:teacher", "opd_mode": "sampled", "opd_on_policy": 0.5}]),
         "needs the student's own samples"),
    ],
)
def test_bad_recipes_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        load_config(raw=raw)


def test_missing_config_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(raw=cfg(), overrides=["stages.0.lr"])
