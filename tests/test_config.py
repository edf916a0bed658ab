"""Recipes: unknown keys, wrong types, missing files and impossible settings fail before training,
naming the key; overrides apply."""

from pathlib import Path

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
        (cfg(stages=[{"type": "grpo", "micro_batch_size": 0}]), r"stages\[0\].micro_batch_size: must be >= 1"),
        (cfg(stages=[{"type": "sft", "micro_batch_size": 0}]), r"stages\[0\].micro_batch_size: must be >= 1"),
        (cfg(stages=[{"type": "cw_dpo", "l_floor": "batch", "micro_batch_size": 2}]),
         r"stages\[0\].micro_batch_size: this stage runs its batch in one forward: l_floor: batch weighs"),
        (cfg(stages=[{"type": "grpo", "max_tokens_per_micro_batch": 0}]),
         r"stages\[0\].max_tokens_per_micro_batch: must be >= 1"),
        (cfg(stages=[{"type": "grpo", "max_tokens_per_micro_batch": 4096, "micro_batch_size": 2}]),
         r"stages\[0\].max_tokens_per_micro_batch: set it or micro_batch_size, not both"),
        (cfg(stages=[{"type": "grpo", "gentle": {"variant": "hinge"}}]),
         r"stages\[0\].gentle: gentle negatives are for sft stages, not 'grpo'"),
        (cfg(stages=[{"type": "cw_dpo", "l_floor": "batch", "max_tokens_per_micro_batch": 4096}]),
         r"stages\[0\].max_tokens_per_micro_batch: this stage runs its batch in one forward"),
        (cfg(stages=[{"type": "grpo", "tis_cap": 0}]), r"stages\[0\].tis_cap: must be a finite number > 0"),
        (cfg(stages=[{"type": "grpo", "loss_type": "gspo", "aggregation": "seq-mean-token-sum"}]),
         r"stages\[0\].aggregation: loss_type gspo sets the aggregation"),
        (cfg(stages=[{"type": "grpo", "loss_type": "ppo"}]), r"stages\[0\].loss_type: must be one of"),
        (cfg(stages=[{"type": "grpo", "kl_estimator": "k4"}]), r"stages\[0\].kl_estimator: must be one of"),
        (cfg(stages=[{"type": "grpo", "is_mode": "clip"}]), r"stages\[0\].is_mode: must be one of"),
        (cfg(stages=[{"type": "grpo", "overlong_penalty": 0.5}]), r"stages\[0\].overlong_penalty: needs overlong_b"),
        (cfg(stages=[{"type": "grpo", "overlong_buffer": 600}]), r"stages\[0\].overlong_buffer: must be in \[1, "),
        (cfg(stages=[{"type": "sft", "loss_type": "dapo"}]), r"stages\[0\].loss_type: GRPO loss types are for grpo"),
        (cfg(stages=[{"type": "dpo", "tis_cap": 2.0}]), r"stages\[0\].tis_cap: importance sampling weights are"),
        (cfg(stages=[{"type": "sft", "lr": "fast"}]), r"stages\[0\].lr: expected a number"),
        (cfg(stages=[{"type": "opd"}]), r"stages\[0\].teacher: opd needs a teacher"),
        (cfg(stages=[{"type": "opd", "teacher": "/no/such/teacher"}]),
         r"stages\[0\].teacher: /no/such/teacher not found"),
        (cfg(stages=[{"type": "cw_dpo", "l_floor": "low"}]), r"stages\[0\].l_floor"),
        (cfg(stages=[{"type": "sft", "gentle": {"lamda": 1}}]), r"stages\[0\].gentle: unknown key"),
        # a key only another stage type reads, given a value of its own, is refused (it would be silently ignored)
        (cfg(stages=[{"type": "sft", "beta": 0.5}]), r"stages\[0\].beta: preference strengths are for dpo and cw_dpo"),
        (cfg(stages=[{"type": "dpo", "clip_high": 0.28}]), r"stages\[0\].clip_high: ratio clips are for grpo"),
        (cfg(stages=[{"type": "grpo", "teacher": "tiny:teacher"}]), r"stages\[0\].teacher: teachers are for opd"),
        (cfg(stages=[{"type": "cw_dpo", "group_size": 8}]), r"stages\[0\].group_size: groups of samples are for"),
        (cfg(stages=[{"type": "dpo", "tau_c": 2.0}]), r"stages\[0\].tau_c: cooling weights are for cw_dpo stages"),
        (cfg(stages=[{"type": "sft", "label_smoothing": 0.1, "gentle": {"variant": "hinge"}}]),
         r"stages\[0\].label_smoothing: is plain SFT's"),
        (cfg(stages=[]), "at least one stage"),
        (cfg(data={"train": "/no/such.parquet"}), "data.train: /no/such.parquet not found"),
        (cfg(data={}), "data: give data.synthetic or data.train"),
        (cfg(eval={"n_samples": 2, "k": [1, 4]}), "eval.k"),
        (cfg(eval={"num_problems": 8, "sample_problems": 9}), "eval.sample_problems: 9 is more than"),
        (cfg(model={"path": "tiny:giant"}), "model.path: tiny models"),
        (cfg(deepspeed={"zero_stage": 4}), "deepspeed.zero_stage"),
        (cfg(data={"synthetic": {"question_types": ["count_all", "shade"]}}),
         r"data.synthetic.question_types: \['shade'\]"),
        (cfg(data={"synthetic": {"size_range": [0.3, 0.1]}}), "data.synthetic.size_range"),
        (cfg(data={"synthetic": {"max_shapes": 0}}), "data.synthetic.max_shapes"),
        (cfg(stages=[{"type": "opd", "teacher": "tiny:teacher", "opd_on_policy": 1.5}]), r"stages\[0\].opd_on_policy"),
        (cfg(stages=[{"type": "opd", "teacher": "tiny:teacher", "opd_mode": "sampled", "opd_on_policy": 0.5}]),
         "needs the student's own samples"),
        # ranges and the loss modules' own checks, each named by its key (issue 16)
        (cfg(stages=[{"type": "sft", "warmup_steps": -5}]), r"stages\[0\].warmup_steps: must be >= 0"),
        (cfg(stages=[{"type": "sft", "lr_schedule": "step"}]), r"stages\[0\].lr_schedule: must be one of"),
        (cfg(run={"report_to": ["tensorbored"]}), r"run.report_to: must be a list of"),
        (cfg(run={"report_to": ["none", "tensorboard"]}), r"run.report_to: none goes alone"),
        (cfg(run={"report_to": ["wandb"]}), r"run.report_to: wandb is not installed \(pip install wandb\)"),
        (cfg(eval={"every": 0}), r"eval.every: must be >= 1"),
        (cfg(stages=[{"type": "sft"}, {"type": "grpo", "aggregation": "token_mean"}]),
         r"stages\[1\].aggregation: must be one of"),
        (cfg(stages=[{"type": "grpo", "clip_low": 1.5}]), r"stages\[0\].clip_low: must be < 1"),
        (cfg(stages=[{"type": "grpo", "temperature": 0}]), r"stages\[0\].temperature: must be"),
        (cfg(stages=[{"type": "sft", "temperature": 0}]), r"stages\[0\].temperature: must be"),
        (cfg(stages=[{"type": "grpo", "kl_coef": -1}]), r"stages\[0\].kl_coef: must be"),
        (cfg(stages=[{"type": "grpo", "advantage_scale": "rank"}]), r"stages\[0\].advantage_scale"),
        (cfg(stages=[{"type": "dpo", "beta": 0}]), r"stages\[0\].beta: must be"),
        (cfg(stages=[{"type": "cw_dpo", "tau_c": -1}]), r"stages\[0\].tau_c: must be"),
        (cfg(deepspeed={"grad_accum": 0}), r"deepspeed.grad_accum: must be >= 1"),
        (cfg(deepspeed={"grad_accum": 4}, run={"checkpoint_every": 6}), r"run.checkpoint_every: must be a multiple"),
        (cfg(deepspeed={"grad_accum": 2}, stages=[{"type": "sft", "steps": 3}]),
         r"stages\[0\].steps: must be a multiple"),
        (cfg(run={"checkpoint_every": 0}), r"run.checkpoint_every: must be >= 1"),
        (cfg(stages=[{"type": "sft", "early_stopping": {"metric": "val/acc"}}]),
         r"stages\[0\].early_stopping.metric: no evaluation of this recipe produces 'val/acc'"),
        (cfg(data={"train": "/tmp"}, stages=[{"type": "sft", "early_stopping": {"metric": "val/accuracy"}}]),
         r"early_stopping.metric: no evaluation of this recipe produces 'val/accuracy'"),  # no val split
        (cfg(stages=[{"type": "sft", "gentle": {"variant": "hing"}}]), r"stages\[0\].gentle.variant: must be one of"),
        (cfg(stages=[{"type": "sft", "max_new_tokens": 0}]), r"stages\[0\].max_new_tokens: must be >= 1"),
        (cfg(eval={"temperature": -1}), r"eval.temperature: must be >= 0"),
        (cfg(eval={"k": [1, "4"]}), r"eval.k\[1\]: expected an integer, got '4'"),
        (cfg(data={"synthetic": {}, "eval_splits": {"ood2": 5}}), r"data.eval_splits.ood2: expected a string"),
        (cfg(model={"dtype": "bfloat16"}), r"model.dtype: bfloat16 weights with deepspeed.precision: fp32"),
        (cfg(model={"dtype": "float16"}), r"model.dtype: float16 training is not supported"),
        (cfg(deepspeed={"zero_stage": 3, "stage3_param_persistence_threshold": -1}),
         r"deepspeed.stage3_param_persistence_threshold: must be >= 0"),
    ],
)
def test_bad_recipes_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        load_config(raw=raw)


def test_user_mistakes_are_named_before_any_work(tmp_path):
    """What a new user gets wrong: not a number, a run folder outside out_dir, an out_dir that is a file, two data
    sources at once, a recipe path that is a folder, an unknown top-level key (named as the recipe's)."""
    (tmp_path / "file").write_text("x")
    cases = [
        (cfg(stages=[{"type": "sft", "lr": float("nan")}]), r"stages\[0\].lr: must be a finite number > 0, got nan"),
        (cfg(stages=[{"type": "sft", "lr": float("inf")}]), r"stages\[0\].lr: must be a finite number > 0"),
        (cfg(model={"path": "tiny:student", "vision_lr_mult": float("inf")}), "model.vision_lr_mult: must be a finite"),
        (cfg(run={"name": "/etc"}), r"run.name: names a folder inside run.out_dir .*'/etc'"),
        (cfg(run={"name": "../../x"}), r"run.name: names a folder inside run.out_dir"),
        (cfg(run={"name": ""}), r"run.name: names a folder inside run.out_dir"),
        (cfg(run={"out_dir": str(tmp_path / "file")}), r"run.out_dir: .*file is a file, not a folder"),
        (cfg(data={"synthetic": {"train": 8}, "train": str(tmp_path / "file")}), "data: give data.synthetic or data."),
        (cfg(data={"synthetic": {"train": 0}}), r"data.synthetic.train: must be >= 1, got 0"),
        (cfg(data={"synthetic": {"image_size": 0}}), r"data.synthetic.image_size: must be >= 28, got 0"),
        ({**cfg(), "modle": {}}, r"^the recipe: unknown key\(s\) \['modle'\]"),
        (cfg(data={"train": str(tmp_path)}, stages=[{"type": "sft", "early_stopping": {"metric": "val/accuracy"}}]),
         r"early_stopping.metric: .*it evaluates nothing: give data.val"),
    ]
    for raw, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_config(raw=raw)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    assert load_config(raw=cfg(run={"name": "seed0/sft"})).run_dir == Path("runs") / "seed0" / "sft"  # a study's


def test_missing_config_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(raw=cfg(), overrides=["stages.0.lr"])


def test_early_stopping_metric_names_are_what_an_evaluation_records():
    """The names validation accepts are exactly the eval record's keys (tested against a real record in
    test_train.py::test_sft_loss_falls_and_run_dir_is_complete)."""
    from vlmfast.config import eval_metric_names

    names = eval_metric_names(load_config(raw=cfg(eval={"k": [1, 2]})))
    assert {"val/accuracy", "ood/pass@2_hi", "val/entropy_answer", "dlogp_pos"} <= names
    assert "val/pass@4" not in names


def test_broken_yaml_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n   seed: 1\nstages: []\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert str(bad) in msg and "line 3" in msg and "\n" not in msg


def test_every_key_has_a_meaning():
    from vlmfast.config import SECTIONS, key_meanings

    for section, cls in SECTIONS.items():
        meanings = key_meanings(cls)
        import dataclasses

        for f in dataclasses.fields(cls):
            assert meanings.get(f.name), f"{section}.{f.name} has no comment in config_schema.py"


def test_batches_that_do_not_split_over_the_ranks_are_named():
    from vlmfast.config import check_ranks

    grpo = cfg(stages=[{"type": "sft", "batch_size": 8},
                       {"type": "grpo", "batch_size": 2, "group_size": 4, "micro_batch_size": 3}])
    c = load_config(raw=grpo)
    check_ranks(c, 1)  # 8 sequences per update: micro-batches of 3, 3 and 2
    check_ranks(c, 2)  # 4 per rank: 2 and 2
    with pytest.raises(ConfigError, match=r"stages\[0\].batch_size=8 is not divisible by the 3 ranks \(it splits "
                                          r"over 1, 2, 4, 8 ranks"):
        check_ranks(c, 3)


def test_micro_batches_are_at_most_micro_batch_size_and_as_even_as_they_go():
    from vlmfast.config import StageConfig
    from vlmfast.stages import STAGES, even_row_slices

    for n, parts in ((20, 3), (80, 10), (5, 1), (7, 7), (10, 4)):
        sizes = [sl.stop - sl.start for sl in even_row_slices(n, parts)]
        assert sum(sizes) == n and len(sizes) == parts and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)[::-1]
    stage = StageConfig(type="grpo", batch_size=128, group_size=5, micro_batch_size=8)
    # 80, 40, 20, 10 and 5 sequences per rank at 8 to 128 ranks
    assert [STAGES["grpo"].micro_batches(stage, w) for w in (8, 16, 32, 64, 128)] == [10, 5, 3, 2, 1]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_follow_their_formulas(schedule):
    """transformers' schedules as the trainer reads them per step: warm-up counts the step taken (step 0 at
    1/warmup, never 0), then constant, linear (T - s)/(T - w) or cosine 0.5(1 + cos(pi (s - w)/(T - w)))."""
    import math

    from vlmfast.config import StageConfig
    from vlmfast.stage_loop import lr_scale

    T, w = 10, 3
    scale = lr_scale(StageConfig(steps=T, warmup_steps=w, lr_schedule=schedule))
    for s in range(T):
        if s < w:
            want = (s + 1) / w
        elif schedule == "constant":
            want = 1.0
        elif schedule == "linear":
            want = (T - s) / (T - w)
        else:
            want = 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w)))
        assert scale(s) == pytest.approx(want, abs=1e-9), (schedule, s)


def test_zero_network_keys_reach_deepspeed_and_the_plan():
    """overlap_comm, the bucket sizes and ZeRO++'s hierarchical partition size go into DeepSpeed's config (ZeRO-3
    keys only under ZeRO-3); hpZ's second 16-bit shard is in the plan's model states; an hpZ size the ranks cannot
    be grouped by is refused, as is hpZ below ZeRO-3."""
    from vlmfast.config import check_ranks
    from vlmfast.plan import GiB, model_size, plan
    from vlmfast.policy import ds_config

    keys = {"overlap_comm": True, "reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
            "zero_hpz_partition_size": 8}
    zero = ds_config(load_config(raw=cfg(deepspeed={"zero_stage": 3, **keys})), 4)["zero_optimization"]
    assert {k: zero[k] for k in keys} == keys
    zero2 = ds_config(load_config(raw=cfg(deepspeed={"zero_stage": 2, "overlap_comm": False})), 4)["zero_optimization"]
    assert zero2 == {"stage": 2, "overlap_comm": False}
    with pytest.raises(ConfigError, match="zero_hpz_partition_size: ZeRO\\+\\+ hierarchical partitioning is ZeRO-3"):
        load_config(raw=cfg(deepspeed={"zero_stage": 2, "zero_hpz_partition_size": 8}))
    c = load_config(raw=cfg(deepspeed={"zero_stage": 3, "zero_hpz_partition_size": 8},
                            stages=[{"type": "sft", "batch_size": 48}]))
    check_ranks(c, 16)
    with pytest.raises(ConfigError, match="zero_hpz_partition_size=8 does not divide the 12 ranks"):
        check_ranks(c, 12)
    recipe = "recipes/qwen25vl7b_geo3k_grpo.yaml"
    on, off = (plan(load_config(recipe, [f"deepspeed.zero_hpz_partition_size={n}"]), gpus=16,
                    gpu_memory=80 * GiB)[0].update["policy states"] for n in (8, 1))
    assert on - off == 2 * model_size("Qwen/Qwen2.5-VL-7B-Instruct").params // 8


def test_token_budget_slices_hold_whole_sequences_up_to_the_budget():
    import random

    from vlmfast.stages import token_budget_slices

    lengths = [5, 3, 9, 2, 2, 7, 12, 1]
    got = token_budget_slices(lengths, 10)
    assert [(sl.start, sl.stop) for sl in got] == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        lengths = [rng.choice([rng.randint(1, 20), rng.randint(50, 200)]) for _ in range(n)]
        budget = rng.randint(20, 300)
        free = token_budget_slices(lengths, budget)
        for count in (None, rng.randint(len(free), n)):
            sl = token_budget_slices(lengths, budget, count)
            assert [i for s in sl for i in range(s.start, s.stop)] == list(range(n))  # every row once, in order
            assert all(sum(lengths[s]) <= budget or s.stop - s.start == 1 for s in sl)
            assert len(sl) == (count or len(free))
    with pytest.raises(ValueError, match="3 rows cannot make 4"):
        token_budget_slices([1, 1, 1], 10, 4)
