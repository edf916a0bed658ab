"""Gathered generation under ZeRO-3 when the ranks decode different numbers of tokens (each stops when its own
samples end) while DeepSpeed's module trace is not complete: its root start-of-forward hook broadcasts at a decode
step then (reset_step), and ranks decoding different numbers of tokens would wait on each other forever
(vlmfast.zero.gathered_for_generation takes it off for the block). Two gloo ranks, a tiny Qwen2.5-VL with every
parameter partitioned: no broadcast inside the gathered block; rank 0 decodes 2 tokens, rank 1 up to 12, then a
collective still pairs up."""

import pytest
from _launch import two_rank_script

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(300)]

SCRIPT = """
import json, os, torch
os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed
torch.distributed.init_process_group("gloo")
from vlmfast.models import tiny_vlm
from vlmfast.rollout import HFEngine, Sampling
from vlmfast.zero import gathered_for_generation
rank = torch.distributed.get_rank()
model, proc = tiny_vlm("student", seed=0)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
          "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
import contextlib
broadcasts = []  # inside the gathered block: a collective there would pair up only if the ranks decode alike
real_broadcast = torch.distributed.broadcast
def counted(*a, **k):
    broadcasts.append(inside[0])
    return real_broadcast(*a, **k)
torch.distributed.broadcast = counted
inside = [False]
@contextlib.contextmanager
def gather():
    with gathered_for_generation(engine):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False
hf = HFEngine(engine.module, proc, gather=gather)
out = hf.generate(["How many shapes?"], [[]], n=2, sampling=Sampling(temperature=1.0, max_new_tokens=[2, 12][rank]),
                  seeds=[rank])
done = torch.tensor([float(rank + 1)])
torch.distributed.all_reduce(done)  # pairs up only if neither rank is stuck in a decode step's collective
print(json.dumps({"lengths": [len(c.token_ids) for c in out[0]], "sum": done.item(), "inside": sum(broadcasts)}))
torch.distributed.destroy_process_group()
"""


def test_ranks_decoding_different_lengths_do_not_wait_on_each_other():
    from pathlib import Path

    zero, one = two_rank_script(SCRIPT, Path(__file__).resolve().parents[1], timeout=240)
    assert zero["sum"] == one["sum"] == 3.0
    assert zero["inside"] == one["inside"] == 0  # no collective while generating (DeepSpeed's reset_step broadcasts)
    assert max(zero["lengths"]) <= 2 and max(one["lengths"]) > 2  # the ranks did decode different lengths
