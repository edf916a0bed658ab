"""LoRA as it runs at 7B: 2 CPU ranks under ZeRO-3 with every parameter partitioned (base, adapters and the parts
trained whole), against one process without DeepSpeed partitioning. SFT, GRPO with the KL to the reference (the
policy with its adapters off) and 2 updates per rollout, DPO (its reference the same way), adapters on the language
model and the vision blocks, the projector trained whole. Both runs must end at the same losses, the same merged
weights and the same adapters; the adapters-off reference equals the stage start (DPO's first loss is log 2, GRPO's
first KL 0); each hand-off holds the merged model and the adapters. Adapters handed on (with a head trained whole)
load into a model loaded into partitions.
"""

import json
import math

import pytest
import torch
import yaml
from _launch import train_one_process, train_two_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.timeout(900)]

STAGES = [
    {"type": "sft", "name": "sft", "steps": 2, "lr": 5e-3, "batch_size": 4},
    {"type": "grpo", "name": "grpo", "steps": 2, "lr": 2e-3, "batch_size": 2, "group_size": 4, "kl_coef": 0.1,
     "entropy_coef": 0.5, "updates_per_rollout": 2, "max_new_tokens": 6},
    {"type": "dpo", "name": "dpo", "steps": 2, "lr": 2e-3, "batch_size": 2, "beta": 0.5, "max_new_tokens": 6},
]
LORA = {"r": 4, "alpha": 8, "vision": "lora", "projector": "full"}


def _recipe(tmp, name, deepspeed):
    raw = {"run": {"name": name, "out_dir": str(tmp), "threads": 1, "checkpoint_every": 100},
           "model": {"path": "tiny:student", "lora": LORA},
           "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
           "deepspeed": deepspeed,
           "eval": {"every": 1000, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 2,
                    "at_start": False},
           "stages": STAGES}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_zero3")
    train_one_process(_recipe(tmp, "one", {"zero_stage": 0}))
    train_two_ranks(_recipe(tmp, "two", {"zero_stage": 3, "stage3_param_persistence_threshold": 0}))
    return tmp / "one", tmp / "two"


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _hand_off(run_dir, stage):
    """(the merged model's state dict as transformers loads it, the adapters' tensors as saved)."""
    from safetensors.torch import load_file

    from vlmfast.models import load_model

    hf = run_dir / "checkpoints" / f"final-{stage}" / "hf"
    return load_model(str(hf))[0].state_dict(), load_file(hf / "adapter" / "adapter_model.safetensors")


def test_losses_match_one_process(runs):
    one, two = runs
    a, b = _train_records(one), _train_records(two)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=5e-3, abs=1e-3), (x["stage"], x["step"])


def test_the_reference_is_the_stage_start_on_both(runs):
    for run_dir in runs:
        recs = _train_records(run_dir)
        grpo = [r for r in recs if r["stage"] == "grpo"]
        assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the first update: the policy is its reference
        assert grpo[-1]["kl"] > 1e-6
        dpo = next(r for r in recs if r["stage"] == "dpo")
        assert dpo["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_merged_weights_and_adapters_match_one_process(runs):
    from vlmfast.models import tiny_vlm

    one, two = runs
    init = tiny_vlm("student", seed=0)[0].state_dict()
    for stage in range(len(STAGES)):
        (ma, aa), (mb, ab) = _hand_off(one, stage), _hand_off(two, stage)
        assert set(ma) == set(init) and set(mb) == set(init)  # the base model's names: a plain HF model
        assert set(aa) == set(ab) and any("lora_A" in k for k in aa)
        moved = torch.cat([(ma[k] - init[k]).flatten() for k in init]) if stage == 0 else None
        if moved is not None:
            assert moved.norm() > 0
        for k in aa:
            torch.testing.assert_close(ab[k], aa[k], rtol=2e-2, atol=2e-4)
        u1 = torch.cat([(ma[k] - init[k]).flatten() for k in init])
        u2 = torch.cat([(mb[k] - init[k]).flatten() for k in init])
        assert ((u1 - u2).norm() / u1.norm()).item() < 1e-2, stage
        # only what LoRA trains moved: the frozen base (embeddings, norms, the vision blocks' own weights) did not
        for k in ("model.language_model.embed_tokens.weight", "model.language_model.norm.weight",
                  "lm_head.weight", "model.visual.blocks.0.norm1.weight"):
            assert torch.equal(ma[k], init[k]) and torch.equal(mb[k], init[k]), k


def _two_ranks_killed_at(config, kill_at: str):
    """train_two_ranks' launch with every rank SIGKILLed at `kill_at` (faults.KILL_AT_ENV): the launcher fails."""
    import subprocess
    import sys

    from _launch import clean_env, free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "vlmfast.train", "--config", str(config)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=800,
                         env=clean_env(DS_ACCELERATOR="cpu", VLMFAST_KILL_AT=kill_at))
    assert res.returncode != 0, "the run was not killed"


def test_a_killed_zero3_lora_run_resumes_to_the_same_numbers(tmp_path):
    """Under ZeRO-3 a LoRA step checkpoint holds the adapters' partitions and optimizer states, not the frozen base
    (loaded from the stage's start): killed inside GRPO on both ranks, the run resumes to the uninterrupted run's
    losses, KL and ratios."""
    raw = {"run": {"out_dir": str(tmp_path), "threads": 1, "checkpoint_every": 1},
           "model": {"path": "tiny:student", "lora": LORA},
           "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
           "deepspeed": {"zero_stage": 3, "stage3_param_persistence_threshold": 0},
           "eval": {"every": 1000, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 0,
                    "at_start": False},
           "stages": [{**STAGES[1], "steps": 4}]}
    paths = {}
    for name in ("whole", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**raw, "run": {**raw["run"], "name": name}}))
    train_two_ranks(paths["whole"])
    _two_ranks_killed_at(paths["killed"], "0:3")  # inside the second rollout, after step 3's checkpoint
    assert (tmp_path / "killed" / "checkpoints" / "step-0-3").exists()
    train_two_ranks(paths["killed"])
    a, b = _train_records(tmp_path / "whole"), _train_records(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "kl", "ratio_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


LOAD_ADAPTERS = """
import json, os, sys, torch
os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed
torch.distributed.init_process_group("gloo")
from safetensors.torch import load_file
from vlmfast.config import load_config
from vlmfast.lora import lora_layers
from vlmfast.policy import load_policy
from vlmfast.zero import gathered
base, adapter = sys.argv[1:3]
cfg = load_config(raw={"model": {"path": base, "lora": {"r": 4, "alpha": 8, "modules_to_save": ["lm_head"],
                                                          "handoff": "adapters"}},
                       "deepspeed": {"zero_stage": 3, "stage3_param_persistence_threshold": 0},
                       "data": {"synthetic": {}}, "stages": [{"type": "sft"}, {"type": "sft"}]})
model, _ = load_policy(cfg, adapter, "cpu")
head = model.lm_head.weight
saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
loaded = {"lm_head.weight": head}
for name, layer in lora_layers(model):
    for part in ("lora_A", "lora_B"):
        loaded[f"{name}.{part}.weight"] = getattr(layer, part)["default"].weight
with gathered(list(loaded.values())):
    err = max((p.detach() - saved["base_model.model." + k]).abs().max().item() for k, p in loaded.items())
print(json.dumps({"partitioned": hasattr(head, "ds_id") and head.numel() == 0, "tensors": len(loaded),
                  "saved": len(saved), "err": err}))
torch.distributed.destroy_process_group()
"""


def test_adapters_handed_on_load_into_a_partitioned_model(tmp_path):
    """handoff: adapters under ZeRO-3 with a checkpoint loaded into partitions: the lm_head trained whole
    (modules_to_save) is a partition when the adapters load, and is written whole and re-partitioned (a plain copy
    into an empty partition fails); on both ranks every saved tensor is the loaded one."""
    from pathlib import Path

    from _launch import two_rank_script

    from vlmfast.checkpoint import ADAPTER_DIR, save_hf
    from vlmfast.config import LoraSettings
    from vlmfast.lora import apply_lora, lora_layers
    from vlmfast.models import save_pretrained, tiny_vlm

    base = save_pretrained(*tiny_vlm("student", seed=0), tmp_path / "base")
    model, proc = tiny_vlm("student", seed=0)
    apply_lora(model, LoraSettings(r=4, alpha=8, modules_to_save=["lm_head"]))
    with torch.no_grad():  # adapters and a head unlike the fresh ones the load starts from
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
        model.lm_head.weight.mul_(1.5)
    save_hf(model, proc, tmp_path / "hf", base=str(base))
    script = f"import sys; sys.argv = ['x', {str(base)!r}, {str(tmp_path / 'hf' / ADAPTER_DIR)!r}]\n" + LOAD_ADAPTERS
    zero, one = two_rank_script(script, Path(__file__).resolve().parents[1], timeout=240)
    for rank in (zero, one):
        assert rank["partitioned"]  # the mechanism: the base (lm_head included) was loaded into partitions
        assert rank["tensors"] == rank["saved"] > 1 and rank["err"] == 0.0, rank
