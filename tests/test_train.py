"""The trainer end to end on the tiny model (CPU, one process): every stage type runs and moves its
loss the right way, a pipeline hands its checkpoint on, a killed run resumes to the same metrics."""

import json

import pytest

from vlmfast.config import load_config
from vlmfast.faults import FAIL_AT_ENV, SimulatedKill
from vlmfast.train import main, run

pytestmark = pytest.mark.slow


def recipe(tmp_path, stages, name="t", **over):
    raw = {
        "run": {"name": name, "out_dir": str(tmp_path), "seed": 0, "checkpoint_every": 3, "threads": 2},
        "model": {"path": "tiny:student", "vision_lr_mult": 10.0},
        "data": {"synthetic": {"train": 64, "val": 8, "ood": 8, "seed": 0}},
        "eval": {"every": 100, "num_problems": 4, "n_samples": 2, "k": [1, 2], "max_new_tokens": 8, "probes": 4},
        "stages": stages,
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return load_config(raw=raw)


def records(tmp_path, name="t", kind="train"):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_sft_loss_falls_and_run_dir_is_complete(tmp_path, capsys):
    from vlmfast.config import eval_metric_names

    cfg = recipe(tmp_path, [{"type": "sft", "name": "sft", "steps": 12, "lr": 3e-3, "batch_size": 8,
                             "warmup_steps": 2, "lr_schedule": "cosine"}])
    run(cfg)
    out, err = capsys.readouterr()
    # each evaluation printed, a closing line; one progress bar per stage, no checkpoint-writing bars
    assert "[sft] eval at step 0" in out and "[sft] eval at step 12" in out and "val/accuracy" in out
    assert f"done: results in {tmp_path / 't' / 'results.json'}, final model" in out
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert "sft [update]" in err and "sft [eval]" in err  # the bar names the phase that runs
    tr = records(tmp_path)
    assert len(tr) == 12 and all(r["stage"] == "sft" for r in tr)
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in tr)
    assert [r["lr"] for r in tr[:2]] == pytest.approx([1.5e-3, 3e-3]) and tr[-1]["lr"] < 1e-4  # warm-up, cosine
    first, last = sum(r["loss"] for r in tr[:3]) / 3, sum(r["loss"] for r in tr[-3:]) / 3
    assert last < 0.7 * first
    ev = records(tmp_path, kind="eval")
    assert [r["step"] for r in ev] == [0, 12]
    for key in ("val/accuracy", "val/pass@2", "val/pass@2_lo", "val/diversity", "val/ece", "val/entropy",
                "ood/accuracy", "dlogp_pos", "dlogp_neg", "dlogp_greedy"):
        assert key in ev[-1], key
    assert ev[0]["dlogp_pos"] == 0.0 and ev[-1]["dlogp_pos"] > 0  # SFT raises the positives' log-prob
    # what config validation lets early stopping watch is exactly what an evaluation records
    recorded = set(ev[-1]) - {"stage", "stage_index", "step", "kind", "pass_curves", "timing/eval_s"}
    assert recorded == eval_metric_names(cfg)
    run_dir = tmp_path / "t"
    assert (run_dir / "config.yaml").exists() and (run_dir / "samples.jsonl").exists()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    results = json.loads((run_dir / "results.json").read_text())
    assert (tmp_path / "t" / "checkpoints" / "final-0" / "hf" / "config.json").exists()
    assert results["final_model"].endswith("final-0/hf") and "sft" in results["timings_s"]


def test_pipeline_sft_then_grpo_hands_its_checkpoint_on(tmp_path):
    stages = [{"type": "sft", "name": "sft", "steps": 6, "lr": 3e-3, "batch_size": 8},
              {"type": "grpo", "name": "grpo", "steps": 4, "lr": 1e-3, "batch_size": 2, "group_size": 4,
               "max_new_tokens": 8, "kl_coef": 0.01, "entropy_coef": 0.05, "updates_per_rollout": 2}]
    run(recipe(tmp_path, stages))
    ev = records(tmp_path, kind="eval")
    sft_end = [r for r in ev if r["stage"] == "sft"][-1]
    grpo_start = [r for r in ev if r["stage"] == "grpo"][0]
    # GRPO's first evaluation sees exactly the weights SFT ended with
    assert grpo_start["step"] == 0 and grpo_start["val/accuracy"] == sft_end["val/accuracy"]
    assert grpo_start["dlogp_pos"] == pytest.approx(sft_end["dlogp_pos"], abs=1e-6)
    tr = [r for r in records(tmp_path) if r["stage"] == "grpo"]
    assert len(tr) == 4
    # a new rollout at steps 1 and 3 (ratio exactly 1); the second minibatch of each rollout is
    # scored by a policy that has moved since it sampled (ratio != 1)
    assert abs(tr[0]["ratio_mean"] - 1) < 1e-5 and abs(tr[2]["ratio_mean"] - 1) < 1e-5
    assert abs(tr[1]["ratio_mean"] - 1) > 1e-5
    for r in tr:
        for key in ("reward", "accuracy", "format", "entropy", "clip_frac_low", "kl", "sampler_mismatch"):
            assert key in r, key
        assert r["sampler_mismatch"] < 1e-3  # HF sampler vs trainer log-probs


@pytest.mark.parametrize("stage_type", ["dpo", "cw_dpo"])
def test_preference_stages_raise_the_margin(tmp_path, stage_type):
    stages = [{"type": stage_type, "name": stage_type, "steps": 10, "lr": 2e-3, "batch_size": 8, "beta": 0.5,
               "on_policy_fraction": 0.5, "max_new_tokens": 8}]
    run(recipe(tmp_path, stages))
    tr = records(tmp_path)
    assert tr[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # pi == pi_ref at the first step
    assert sum(r["reward_margin"] for r in tr[-3:]) / 3 > 0.1
    assert all(0 <= r["on_policy_negatives"] <= 1 for r in tr)
    if stage_type == "cw_dpo":
        assert all(0 <= r["cooling_weight_mean"] <= 1 for r in tr)
        assert len({round(r["l_floor"], 6) for r in tr}) == 1  # l_floor: auto, fixed at stage start


def test_on_policy_negatives_are_the_policys_own_samples_whole(tmp_path, monkeypatch):
    """CW-DPO's on-policy rejected response is one of the policy's wrong samples token for token (its own
    reasoning and answer, its end of turn), not the gold template with the sampled answer pasted in; the chosen
    one is the gold target."""
    from vlmfast import stages as S

    samples, batches = [], []
    real_sample, real_collate = S.preference._sample_subset, S.preference.collate_token_responses

    def sample_spy(*a, **k):
        out = real_sample(*a, **k)
        samples.append(out)
        return out

    def collate_spy(processor, problems, images, responses):
        batches.append(responses)
        return real_collate(processor, problems, images, responses)

    monkeypatch.setattr(S.preference, "_sample_subset", sample_spy)
    monkeypatch.setattr(S.preference, "collate_token_responses", collate_spy)
    stages = [{"type": "cw_dpo", "name": "cw_dpo", "steps": 1, "lr": 1e-4, "batch_size": 4, "beta": 0.5,
               "on_policy_fraction": 1.0, "max_new_tokens": 6}]
    cfg = recipe(tmp_path, stages, eval={"at_start": False, "probes": 0})
    run(cfg)
    (groups,), (responses,) = samples, batches[-1:]
    chosen, rejected = responses[:4], responses[4:]
    assert records(tmp_path)[0]["on_policy_negatives"] == 1.0  # random weights: every sample is wrong
    assert rejected == [g[0].token_ids for g in groups]  # the first wrong sample, whole
    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_tokenizer

    tok = build_tokenizer(corpus())  # tiny:student's vocabulary
    gold = [tok.decode(c) for c in chosen]
    assert all(text.endswith("<|im_end|>") and "\\boxed{" in text for text in gold)


def test_opd_reduces_kl_to_teacher(tmp_path):
    teacher_dir = tmp_path / "teacher"
    run(recipe(tmp_path, [{"type": "sft", "name": "t", "steps": 8, "lr": 3e-3, "batch_size": 8}], name="teacher"))
    stages = [{"type": "opd", "name": "opd", "steps": 10, "lr": 3e-3, "batch_size": 8, "max_new_tokens": 8,
               "teacher": str(teacher_dir / "checkpoints" / "final-0" / "hf")}]
    run(recipe(tmp_path, stages, name="student"))
    tr = records(tmp_path, "student")
    assert sum(r["kl"] for r in tr[-3:]) / 3 < 0.8 * sum(r["kl"] for r in tr[:3]) / 3
    # the sampled-token form, with the teacher's log-probs from a generation engine's score()
    stages[0].update(opd_mode="sampled", name="opd_sampled")
    run(recipe(tmp_path, stages, name="sampled"))
    tr = records(tmp_path, "sampled")
    # the estimate mean(logp_s - logp_t) on 8 sampled responses is too noisy to fall monotonically in
    # 10 steps; its gradient is checked against a naive implementation in test_losses.py
    assert len(tr) == 10 and all(abs(r["kl"]) < 10 and abs(r["loss"]) < 10 for r in tr)
    assert any(r["loss"] != 0 for r in tr)
    # GKD's mix: half the sequences are dataset targets, with the same full KL to the teacher on them
    stages[0].update(opd_mode="full", name="opd_mix", opd_on_policy=0.5)
    run(recipe(tmp_path, stages, name="mix"))
    tr = records(tmp_path, "mix")
    shares = [r["on_policy_share"] for r in tr]
    assert 0 < sum(shares) / len(shares) < 1 and all(0 <= x <= 1 for x in shares)
    assert sum(r["kl"] for r in tr[-3:]) / 3 < sum(r["kl"] for r in tr[:3]) / 3


def test_killed_run_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    stages = [{"type": "sft", "name": "sft", "steps": 7, "lr": 3e-3, "batch_size": 8},
              {"type": "grpo", "name": "grpo", "steps": 4, "lr": 1e-4, "batch_size": 2, "group_size": 4,
               "max_new_tokens": 8}]
    run(recipe(tmp_path, stages, name="whole"))
    monkeypatch.setenv(FAIL_AT_ENV, "1:2")  # killed inside the second stage
    with pytest.raises(SimulatedKill):
        run(recipe(tmp_path, stages, name="killed"))
    monkeypatch.delenv(FAIL_AT_ENV)
    run(recipe(tmp_path, stages, name="killed"))
    a, b = records(tmp_path, "whole"), records(tmp_path, "killed")
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), (ra["stage"], ra["step"])
    assert [r["val/accuracy"] for r in records(tmp_path, "whole", "eval")] == \
        [r["val/accuracy"] for r in records(tmp_path, "killed", "eval")]


def test_cli_reports_bad_config_by_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {synthetic: {train: 4}}\nstages:\n  - {type: sft, stepz: 3}\n")
    assert main(["--config", str(bad)]) == 2
    assert "stages[0]: unknown key(s) ['stepz']" in capsys.readouterr().err


def test_policy_paths_tiny_teacher_and_default(tmp_path):
    """`tiny:teacher` as an OPD teacher builds the teacher size (not the configured model)."""
    from vlmfast.policy import load_policy as _load_policy

    cfg = recipe(tmp_path, [{"type": "sft", "steps": 1}])
    student, proc = _load_policy(cfg, None, "cpu")
    teacher, _ = _load_policy(cfg, "tiny:teacher", "cpu", proc)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(teacher) > 1.3 * count(student)  # TINY_SIZES: the teacher is the larger model
    assert teacher.lm_head.weight.shape[0] == student.lm_head.weight.shape[0]


def test_probe_baseline_is_the_start_even_without_an_evaluation_there(tmp_path):
    """eval.at_start: false skips the step-0 evaluation, but Δlog p is still measured from step 0:
    the same run with and without the step-0 evaluation records the same Δlog p at its end."""
    stages = [{"type": "sft", "name": "sft", "steps": 4, "lr": 3e-3, "batch_size": 8}]
    run(recipe(tmp_path, stages, name="with", eval={"every": 4}))
    run(recipe(tmp_path, stages, name="without", eval={"every": 4, "at_start": False}))
    with_, without = records(tmp_path, "with", "eval"), records(tmp_path, "without", "eval")
    assert [r["step"] for r in with_] == [0, 4] and [r["step"] for r in without] == [4]
    for key in ("dlogp_pos", "dlogp_neg", "dlogp_greedy"):
        assert without[-1][key] == pytest.approx(with_[-1][key], abs=1e-6), key
    assert without[-1]["dlogp_pos"] != 0.0


def _ragged_data(tmp_path) -> dict:
    """The synthetic task with targets (their reasoning), negatives and images of very different sizes, one or two to a
    problem: micro-batches of different tokens, pushed negatives, rows and images, so
    a share or metric weighed by the wrong count, or an image given to the wrong row, shows."""
    import random

    from vlmfast.data.synthetic import generate, write_parquet

    rng = random.Random(0)
    rows = [r for size in (56, 84) for r in generate("train", 12, seed=size, image_size=size)]
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        if i % 3 == 1:  # the previous row's image beside its own
            r["images"], r["problem"] = rows[i - 1]["images"][-1:] + r["images"], "<image>" + r["problem"]
        r["reasoning"] = "I count the shapes" + " and count again" * rng.randrange(8)
        r["negatives"] = [r["answer"] + "0" * rng.randrange(6) for _ in range(2)]
    path = write_parquet(rows, tmp_path / "ragged.parquet")
    return {"synthetic": None, "train": str(path), "val": str(path), "reasoning": "auto"}


MICRO_STAGES = {
    "sft": {"type": "sft", "label_smoothing": 0.1},
    "sft-hinge": {"type": "sft", "gentle": {"variant": "hinge", "lam": 0.5, "margin": 8.0}},
    "sft-extend": {"type": "sft", "gentle": {"variant": "extend", "alpha": 0.1}},
    "opd": {"type": "opd", "teacher": "tiny:teacher", "opd_on_policy": 0.5, "max_new_tokens": 6},
    "dpo": {"type": "dpo", "beta": 0.5, "on_policy_fraction": 0.5, "max_new_tokens": 6},
    "cw_dpo": {"type": "cw_dpo", "beta": 0.5, "l_floor": "auto", "on_policy_fraction": 0.0},
}


@pytest.mark.parametrize("kind", list(MICRO_STAGES))
def test_every_stage_in_micro_batches_trains_as_its_whole_batch(tmp_path, monkeypatch, kind):
    """SFT (plain and with gentle negatives), OPD, DPO and CW-DPO with micro_batch_size 3 of a rank's 8 rows (3, 3
    and 2) or a token budget of about two rows (whole rows, pairs kept together): several forwards with backward
    between them (the reference and teacher passes in the same slices), yet every step's loss and metrics and the
    final weights are the whole batch's. Each share divides by the whole batch's count (tokens, pairs, pushed
    negatives): a micro-batch's own mean would weigh its few rows as much as the whole batch."""
    import torch

    from vlmfast import stages as S
    from vlmfast.models import load_model, tiny_vlm

    forwards = []  # (grad, rows, tokens) of each trunk forward
    real = S.context.trunk_hidden

    def spy(model, **batch):
        forwards.append((torch.is_grad_enabled(), batch["input_ids"].shape[0], int(batch["attention_mask"].sum())))
        return real(model, **batch)

    for module in (S.context, S.sft, S.opd, S.preference):
        monkeypatch.setattr(module, "trunk_hidden", spy)
    data = _ragged_data(tmp_path)
    stage = {**MICRO_STAGES[kind], "name": "s", "steps": 2, "lr": 2e-3, "batch_size": 8}
    pairs = kind.startswith("sft-") or "dpo" in kind
    budget = 300 if pairs else 150  # real tokens: about two rows (a pair's two sequences, image tokens included)
    runs = {}
    for micro in (None, 3, "tokens"):
        forwards.clear()
        over = {"max_tokens_per_micro_batch": budget} if micro == "tokens" else {"micro_batch_size": micro}
        run(recipe(tmp_path, [{**stage, **over}], name=f"m{micro}", eval={"at_start": False, "probes": 0}, data=data))
        final = load_model(str(tmp_path / f"m{micro}" / "checkpoints" / "final-0" / "hf"))[0]
        runs[micro] = records(tmp_path, f"m{micro}"), final
        trained = [(rows, tokens) for grad, rows, tokens in forwards if grad]
        per_row = 2 if pairs else 1  # trunk forwards per row: gentle's target and negative run apart; DPO's together
        if micro == 3:  # 8 rows at most 3 a forward: 3, 3, 2 (DPO: 6, 6, 4 sequences, chosen and rejected)
            rows = [n for n, _ in trained]
            want = [3, 3, 3, 3, 2, 2] if kind.startswith("sft-") else [3 * per_row, 3 * per_row, 2 * per_row]
            assert rows == want * 2, rows
        if micro == "tokens":  # whole rows up to the budget (a longer row alone), several per step
            assert len(trained) > 2 * per_row * 2 and sum(n for n, _ in trained) == 2 * 8 * per_row, trained
            if not kind.startswith("sft-"):
                assert all(t <= budget or n == per_row for n, t in trained), trained
    init = tiny_vlm("student", seed=0)[0].state_dict()
    whole, w_model = runs[None]
    for m in (3, "tokens"):
        micro, m_model = runs[m]
        assert [r["step"] for r in micro] == [1, 2]
        for a, b in zip(whole, micro):
            keys = set(a) - {"lr", "tokens_per_s", "peak_mem_mb", "step_time_s"} - {k for k in a if "timing" in k}
            assert keys <= set(b)
            for key in keys:  # DPO's rewards start at 0 (policy = reference): fp32 noise of a sum of ~100 log-probs
                if isinstance(a[key], float):
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=2e-5), (m, key)
        a, b = w_model.state_dict(), m_model.state_dict()
        u1 = torch.cat([(a[k] - init[k]).flatten() for k in init])
        u2 = torch.cat([(b[k] - init[k]).flatten() for k in init])
        assert u1.norm() > 0 and ((u1 - u2).norm() / u1.norm()).item() < 1e-3, m


def _recipe_file(tmp_path, name, **over):
    import yaml

    raw = {"run": {"name": name, "out_dir": str(tmp_path), "threads": 2},
           "data": {"synthetic": {"train": 16, "val": 4, "ood": 4}},
           "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0},
           "stages": [{"type": "sft", "name": "sft", "steps": 2, "lr": 1e-3, "batch_size": 4}], **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_changed_recipe_is_refused_by_the_run_it_did_not_make(tmp_path, capsys):
    path = _recipe_file(tmp_path, "r")
    assert main(["--config", str(path)]) == 0
    written = (tmp_path / "r" / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["--config", str(path), "stages.0.lr=0.1", "eval.k=[1, 2]", "eval.n_samples=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "changed: eval.k, stages.0.lr" in err
    assert (tmp_path / "r" / "config.yaml").read_text() == written  # the run dir still tells what trained it
    assert main(["--config", str(path), "run.threads=1"]) == 2  # any change counts
    assert main(["--config", str(path)]) == 0  # the same recipe continues (here: nothing left to train)
    # a run made by an older vlmfast, before some keys existed: they are at their defaults, so it continues; a key
    # it did have, changed, is still refused
    import json

    made = json.loads((tmp_path / "r" / "recipe.json").read_text())
    del made["recipe"]["stages"][0]["balance_batch"], made["recipe"]["model"]["packed_sequences"]
    made["fingerprint"] = "older"
    (tmp_path / "r" / "recipe.json").write_text(json.dumps(made))
    assert main(["--config", str(path)]) == 0
    (tmp_path / "r" / "recipe.json").write_text(json.dumps(made))
    assert main(["--config", str(path), "stages.0.balance_batch=false"]) == 2
    assert "changed: stages.0.balance_batch" in capsys.readouterr().err
    assert main(["--config", str(path), "stages.0.lr=0.1", "run.resume=never"]) == 0  # starting over is allowed
    assert "lr: 0.1" in (tmp_path / "r" / "config.yaml").read_text()


def test_a_bad_data_row_is_one_line_with_exit_2_and_no_run_dir(tmp_path, capsys):
    import json

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"images": ["missing.png"], "problem": "<image>How many?", "answer": "3"}) + "\n")
    path = _recipe_file(tmp_path, "d", data={"train": str(data)})
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data error:") and "\n" not in err and "row 0" in err and "missing.png" in err
    assert not (tmp_path / "d").exists()


def test_print_config_and_help_list_every_key(tmp_path, capsys):
    import dataclasses

    import yaml

    from vlmfast.config import SECTIONS

    path = _recipe_file(tmp_path, "p")
    assert main(["--config", str(path), "--print-config", "stages.0.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["stages"][0]["lr"] == 0.5 and printed["eval"]["temperature"] == 1.0  # defaults resolved
    assert not (tmp_path / "p").exists()  # printing trains nothing
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        assert f"\n{section}:\n" in out
        for f in dataclasses.fields(cls):
            assert f"  {f.name} = " in out, f"{section}.{f.name}"


def test_report_to_sends_every_record_to_each_tracker(tmp_path, monkeypatch):
    """run.report_to through the adapter: a wandb-like tracker (a stand-in module: wandb is not installed
    here) gets one run with the recipe as its config and each stage's metrics on the stage's own step axis;
    report_to: none leaves only metrics.jsonl."""
    import importlib.machinery
    import sys
    import types

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.define_metric = lambda *a, **kw: calls.append(("define", a, kw))
    fake.log = lambda d: calls.append(("log", d))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    stages = [{"type": "sft", "name": "sft", "steps": 2, "lr": 1e-3, "batch_size": 4}]
    run(recipe(tmp_path, stages, name="w", run={"report_to": ["wandb", "tensorboard"]}))
    init = [c for c in calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["name"] == "w" and init[0][1]["config"]["stages"][0]["type"] == "sft"
    assert ("define", ("sft/*",), {"step_metric": "sft/step"}) in calls
    logged = [c[1] for c in calls if c[0] == "log"]
    train = [d for d in logged if "sft/loss" in d]
    assert [d["sft/step"] for d in train] == [1, 2] and any("sft/val/accuracy" in d for d in logged)
    assert list((tmp_path / "w" / "tensorboard" / "sft").glob("events.out.tfevents.*"))  # a folder per stage
    run(recipe(tmp_path, stages, name="n", run={"report_to": ["none"]}))
    assert (tmp_path / "n" / "metrics.jsonl").exists() and not (tmp_path / "n" / "tensorboard").exists()

    # a killed run resumed logs into the wandb run it started (its id again); another run gets its own
    from vlmfast.faults import FAIL_AT_ENV, SimulatedKill

    # killed after step 2's record (in its evaluation), before its checkpoint: step 2 is replayed, and TensorBoard
    # (the resumed stage's writer purges past the checkpoint) holds each step once
    killed = recipe(tmp_path, stages, name="k", run={"report_to": ["wandb", "tensorboard"], "checkpoint_every": 1})
    monkeypatch.setenv(FAIL_AT_ENV, "0:eval:2")
    with pytest.raises(SimulatedKill):
        run(killed)
    monkeypatch.delenv(FAIL_AT_ENV)
    run(killed)
    ids = [c[1]["id"] for c in calls if c[0] == "init"]
    assert len(ids) == 3 and ids[1] == ids[2] != ids[0]
    # wandb cannot take a point back: over the killed run and its resume each record is sent once (the replayed
    # step 2's train record, sent before the kill, not again; its evaluation, killed before written, by the resume)
    inits = [i for i, c in enumerate(calls) if c[0] == "init"]
    sent = [c[1] for c in calls[inits[1]:] if c[0] == "log"]
    assert [d["sft/step"] for d in sent if "sft/loss" in d] == [1, 2]
    assert [d["sft/step"] for d in sent if "sft/val/accuracy" in d] == [0, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "k" / "tensorboard" / "sft"))
    events.Reload()
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]


def test_early_stopping_hands_on_the_best_step_and_says_which(tmp_path):
    """With early stopping the weights handed on are the best evaluation's; results.json names its step (the
    study's figures start Stage 2 there, not at Stage 1's last evaluation)."""
    stages = [{"type": "sft", "name": "sft", "steps": 12, "lr": 1e-3, "batch_size": 4,
               "early_stopping": {"metric": "val/accuracy", "mode": "max", "patience": 1, "min_delta": 10.0}}]
    run(recipe(tmp_path, stages, eval={"every": 2, "at_start": False, "probes": 0}))
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    evals = [r["step"] for r in records(tmp_path, kind="eval")]
    assert evals == [2, 4]  # nothing beats the first evaluation by 10: stopped at the second
    assert res["results"]["sft"]["handoff_step"] == 2 and res["final_model"].endswith("best-0/hf")
    # the numbers results.json and the report give are the handed-on weights' (step 2's), not step 4's
    from vlmfast.report import read_run, stage_endpoints

    step2 = records(tmp_path, kind="eval")[0]
    assert res["results"]["sft"]["step"] == 2 and res["results"]["sft"]["val/entropy"] == step2["val/entropy"]
    assert stage_endpoints(read_run(tmp_path / "t"))["sft"]["step"] == 2
