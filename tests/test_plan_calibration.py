"""`vlmfast plan` against a measured peak: a random-initialised ~0.45B Qwen2.5-VL (Qwen2.5-0.5B's widths and
vocabulary, 12 layers), saved and loaded as a user's checkpoint, one SFT training step through `vlmfast.train`
on the CPU. Its model states dominate, as at 7B: the plan's prediction for one device must come within 25% of
the measured peak above the process's baseline, and its parameter counts and ZeRO model states must be
DeepSpeed's own (counted from the real model's tensors, not the meta-device model the plan builds)."""

import json
import subprocess
import sys

import pytest
from _launch import clean_env

pytestmark = [pytest.mark.slow, pytest.mark.memory, pytest.mark.timeout(900)]

# Qwen2.5-0.5B's text widths and vocabulary, 12 of its 24 layers: 0.45B parameters, 7 GiB of fp32 training states
TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=12, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936)

MEASURE = r"""
import json, os, resource, sys
from vlmfast.config import load_config
from vlmfast.faults import FAIL_AT_ENV, SimulatedKill
from vlmfast.train import run

def rss():  # resident bytes now
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cfg = load_config(sys.argv[1])
baseline = rss()
os.environ[FAIL_AT_ENV] = "0:1"  # stop before step 2: no checkpoint or evaluation after the measured step
try:
    run(cfg)
except SimulatedKill:
    pass
print(json.dumps({"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The ~0.45B model with random weights, saved as a local checkpoint (1.8 GB of safetensors)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmfast.models import save_pretrained, tiny_config, tiny_vlm

    processor = tiny_vlm("student")[1]
    tiny = tiny_config("student", processor.tokenizer)  # its special token ids and small vision tower
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = {k: v for k, v in tiny.text_config.to_dict().items() if k != "layer_types"}  # derived per layer
    text.update(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]})
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id",
           "eos_token_id", "pad_token_id")
    config = Qwen2_5_VLConfig(text_config=text, vision_config={**tiny.vision_config.to_dict(),
                                                               "out_hidden_size": TEXT["hidden_size"]},
                              tie_word_embeddings=False, **{k: getattr(tiny, k) for k in ids})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    from deepspeed.runtime.zero.stage3 import model_to_params

    counts = model_to_params(model)  # DeepSpeed's count: unique storages, largest module's own parameters
    path = save_pretrained(model, processor, tmp_path_factory.mktemp("calibration") / "model")
    del model
    return path, counts


def _recipe(tmp_path, model_path):
    import yaml

    raw = {"run": {"name": "calibration", "out_dir": str(tmp_path), "threads": 2, "checkpoint_every": 100},
           "model": {"path": str(model_path)}, "data": {"synthetic": {"train": 32, "val": 4, "ood": 4}},
           "eval": {"every": 100, "at_start": False, "probes": 0},
           "stages": [{"type": "sft", "steps": 2, "batch_size": 4, "max_new_tokens": 16}]}
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _prompt_tokens(cfg) -> int:
    """The longest prompt (text and image tokens) of the synthetic task's training rows."""
    from vlmfast.data.collate import collate
    from vlmfast.data.loading import load_data
    from vlmfast.models import tiny_vlm

    processor = tiny_vlm("student")[1]
    exs = load_data(cfg)["train"]
    batch = collate(processor, [e.problem for e in exs], [e.images for e in exs], ["" for _ in exs])
    return int(batch["prompt_lengths"].max())


def test_plan_counts_and_states_are_deepspeeds(checkpoint):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from vlmfast.plan import model_size, model_states_bytes

    path, (total, largest) = checkpoint
    size = model_size(str(path))
    assert (size.params, size.largest_layer) == (total, largest)
    assert 0.4e9 < total < 0.5e9
    for gpus in (1, 8):
        assert model_states_bytes(size, 3, gpus, "bf16") == estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=gpus, cpu_offload=False)[1]
        assert model_states_bytes(size, 2, gpus, "bf16") == estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=gpus, cpu_offload=False)[1]


def test_predicted_peak_is_within_25_percent_of_a_measured_training_step(checkpoint, tmp_path):
    from vlmfast.config import load_config
    from vlmfast.plan import GiB, plan

    path, _ = checkpoint
    recipe = _recipe(tmp_path, path)
    res = subprocess.run([sys.executable, "-c", MEASURE, str(recipe)], capture_output=True, text=True,
                         timeout=800, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    step = [json.loads(line) for line in (tmp_path / "calibration" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in step] == [1]  # exactly one training step ran
    cfg = load_config(recipe)
    (stage,) = plan(cfg, gpus=1, gpu_memory=1024 * GiB, prompt_tokens=_prompt_tokens(cfg))
    predicted = sum(stage.update.values())
    above_baseline = measured["peak"] - measured["baseline"]
    print(f"predicted {predicted / GiB:.2f} GiB ({', '.join(f'{k} {v / GiB:.2f}' for k, v in stage.update.items())})"
          f"; measured {above_baseline / GiB:.2f} GiB above a {measured['baseline'] / GiB:.2f} GiB baseline")
    assert abs(predicted - above_baseline) / above_baseline < 0.25
