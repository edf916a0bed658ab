"""Run by tests/test_zero3_head.py in a fresh process: on a ZeRO-3-partitioned tiny Qwen2.5-VL (threshold 0,
as a 7B model is) the fused SFT loss through `call_head` gives the same loss and gradients as without
DeepSpeed; every other way the trainer reaches a partitioned model (head statistics, a frozen engine
loaded straight into partitions, a frozen weight copy, generation with the policy gathered or left
partitioned) gives what the plain model gives, and a direct read of lm_head.weight fails.

Prints one JSON line of measurements.
"""

import io
import json
import os
import socket
import sys

import torch
from PIL import Image

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                  DS_ACCELERATOR="cpu")

import deepspeed  # noqa: E402

from vlmfast import sft_loss, token_stats  # noqa: E402
from vlmfast.data.collate import collate  # noqa: E402
from vlmfast.data.synthetic import generate  # noqa: E402
from vlmfast.models import (  # noqa: E402
    call_head,
    frozen_head_weight,
    head_token_stats,
    load_model,
    save_pretrained,
    tiny_vlm,
    trunk_hidden,
)
from vlmfast.rollout import HFEngine, Sampling  # noqa: E402
from vlmfast.zero import frozen_engine, gathered_for_generation, is_partitioned, partitioned_loading  # noqa: E402

rows = generate("train", 2, seed=0)
images = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]


def loss_and_grads(model, proc, backward):
    batch = collate(proc, [r["problem"] for r in rows], images, ["\\boxed{3}", "<think>x</think> \\boxed{red}"])
    hidden = trunk_hidden(model, **batch)
    loss, _ = call_head(model, hidden, lambda h, w: sft_loss(h, w, batch["labels"]))
    backward(loss)
    return loss.item()


plain, proc = tiny_vlm("student", seed=0)
plain_loss = loss_and_grads(plain, proc, lambda l: l.backward())
names = ["lm_head.weight", "model.language_model.layers.0.mlp.up_proj.weight", "model.visual.merger.mlp.0.weight"]
plain_grads = {n: dict(plain.named_parameters())[n].grad.clone() for n in names}

deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "fp16": {"enabled": False},
          "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True}
# a model built normally is partitioned by deepspeed.initialize (zero.Init would re-run HF's init)
model, _ = tiny_vlm("student", seed=0, processor=proc)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
partitioned = model.lm_head.weight.numel()  # 0 outside a gather: the head really is partitioned
zero_loss = loss_and_grads(model, proc, engine.backward)
diff = {}
for n in names:
    g = deepspeed.utils.safe_get_full_grad(dict(model.named_parameters())[n])
    diff[n] = (g - plain_grads[n]).abs().max().item() / plain_grads[n].abs().max().item()

out = {"partitioned_numel": partitioned, "loss": [plain_loss, zero_loss], "max_grad_diff": diff}

# a direct read of the partitioned head, as the old probes and recomputes did
batch = collate(proc, [r["problem"] for r in rows], images, ["\\boxed{3}", "<think>x</think> \\boxed{red}"])
try:
    token_stats(trunk_hidden(model, **batch), model.lm_head.weight, batch["labels"])
    out["direct_read_error"] = None
except ValueError as e:
    out["direct_read_error"] = str(e)


def stats_of(m):
    with torch.no_grad():
        r = head_token_stats(m, trunk_hidden(m, **batch), batch["labels"], outputs=("logp", "entropy"))
    return r.logp, r.entropy


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# the same weights as `model`: compare through the plain copy, which saw the same zero-lr SGD step
reference_stats = stats_of(plain)
out["head_stats_diff"] = max_diff(stats_of(model), reference_stats)

# a frozen model loaded straight into its partitions (zero.Init), as the reference and teacher are
save_pretrained(plain, proc, "/tmp/vlmfast-zero3-frozen")
with partitioned_loading(config):
    loaded, _ = load_model("/tmp/vlmfast-zero3-frozen")
out["loaded_partitioned"] = loaded.lm_head.weight.numel() == 0 and is_partitioned(loaded)
frozen = frozen_engine(loaded, config)
out["frozen_stats_diff"] = max_diff(stats_of(frozen.module), reference_stats)
out["frozen_has_optimizer_state"] = any(p.requires_grad for p in frozen.module.parameters())
w = frozen_head_weight(frozen.module)
out["frozen_weight_shape"] = list(w.shape)
out["frozen_weight_diff"] = (w - plain.lm_head.weight).abs().max().item()

# generation: gathered once per call, or left partitioned; the same greedy tokens as the plain model
problems, imgs = [r["problem"] for r in rows], images
greedy = Sampling(temperature=0.0, max_new_tokens=6)


def tokens(engine):
    return [c[0].token_ids for c in engine.generate(problems, imgs, n=1, sampling=greedy)]


plain_tokens = tokens(HFEngine(plain, proc))
out["gathered_same_tokens"] = tokens(HFEngine(model, proc, gather=lambda: gathered_for_generation(engine))) == \
    plain_tokens
out["after_gather_numel"] = model.lm_head.weight.numel()  # partitioned again after the call
out["partitioned_same_tokens"] = tokens(HFEngine(model, proc)) == plain_tokens
# the hooks are back: the training path still gathers the head and gives the same loss
out["loss_after_generate"] = loss_and_grads(model, proc, lambda loss: None)

# apply_vlmfast on the partitioned model: transformers' own loss of the plain model, through the head module
from vlmfast.integrations.transformers import apply_vlmfast, remove_vlmfast  # noqa: E402

hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                   "mm_token_type_ids") if k in batch}
hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
with torch.no_grad():
    want = plain(**hf_inputs, labels=hf_labels).loss.item()
apply_vlmfast(model)
got = model(**hf_inputs, labels=hf_labels)
engine.backward(got.loss)
out["apply_vlmfast"] = {"loss": [want, got.loss.item()], "logits": got.logits is None,
                        "head_grad": deepspeed.utils.safe_get_full_grad(model.lm_head.weight).abs().sum().item()}
remove_vlmfast(model)

# a weight sync's buckets: whole tensors equal to the plain model's, one small bucket gathered at a time
from vlmfast.rollout.weight_sync import weight_buckets  # noqa: E402

plain_params = dict(plain.named_parameters())
whole_at_once, diffs, names_sent = [], [], []
for bucket in weight_buckets(model, 64 * 1024, trainable_only=False):
    whole_at_once.append(sum(p.numel() > 0 for p in model.parameters()))  # gathered right now
    for name, t in bucket:
        diffs.append((t - plain_params[name]).abs().max().item() if t.shape == plain_params[name].shape else 1e9)
        names_sent.append(name)
out["sync"] = {"buckets": len(whole_at_once), "max_gathered": max(whole_at_once), "params": len(plain_params),
               "max_diff": max(diffs), "all_sent": sorted(names_sent) == sorted(plain_params),
               "partitioned_after": model.lm_head.weight.numel() == 0}
print(json.dumps(out))
sys.stdout.flush()
