"""`python -m vlmfast.train` with recording stand-ins (tests only): vLLM is tests/stand_ins/vllm; torch.cuda's
empty_cache and DeepSpeed's offload_states / reload_states are logged, and every forward of a model the trainer
loads (policy, reference, teacher) is logged with whether it builds a graph, in the stand-in's event log
($VLMFAST_EVENTS/rank<RANK>.jsonl)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stand_ins"))

import torch  # noqa: E402
import vllm  # noqa: E402  (the stand-in)

from vlmfast import policy, train  # noqa: E402

torch.cuda.empty_cache = lambda: vllm.record("empty_cache")
_load = policy.load_model_and_processor


def _recorded(*args, **kwargs):
    model, processor = _load(*args, **kwargs)
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: vllm.record("forward", grad=torch.is_grad_enabled()))
    return model, processor


policy.load_model_and_processor = _recorded


def _recording(name):
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = getattr(DeepSpeedEngine, name)

    def method(self, *args, **kwargs):
        vllm.record(name)
        if torch.cuda.is_available():  # DeepSpeed moves the states of its FusedAdam only: the trainer's on GPUs
            return real(self, *args, **kwargs)

    setattr(DeepSpeedEngine, name, method)


# vllm.offload_optimizer: DeepSpeed's calls, logged (on the CPU only logged: DeepSpeed's offload_states asserts
# "Offloading is supported only for DeepSpeed FusedAdam", which the trainer uses on GPUs, torch's AdamW here)
for _name in ("offload_states", "reload_states"):
    _recording(_name)

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
