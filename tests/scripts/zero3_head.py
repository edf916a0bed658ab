"""Run by tests/test_zero3_head.py in a fresh process: the fused SFT loss through `call_head` on a
ZeRO-3-partitioned tiny Qwen2.5-VL must give the same loss and gradients as without DeepSpeed.

Prints one JSON line: {"partitioned_numel": ..., "loss": [plain, zero3], "max_grad_diff": {...}}.
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

from vlmfast import sft_loss  # noqa: E402
from vlmfast.data.collate import collate  # noqa: E402
from vlmfast.data.synthetic import generate  # noqa: E402
from vlmfast.models import call_head, tiny_vlm, trunk_hidden  # noqa: E402

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
print(json.dumps({"partitioned_numel": partitioned, "loss": [plain_loss, zero_loss], "max_grad_diff": diff}))
sys.stdout.flush()
