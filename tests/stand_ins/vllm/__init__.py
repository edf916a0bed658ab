"""A recording stand-in for `vllm` (tests only; put tests/stand_ins first on sys.path): `LLM` keeps what the
real engine does that vlmfast relies on, and logs every call with what is awake at the time.

- Placement as vLLM places its worker: `cuda:{LOCAL_RANK}` with `distributed_executor_backend=
  "external_launcher"`, else `cuda:0` (v1 uniproc_executor / gpu_worker `init_device` take local rank 0).
- Sleep and wake by tags: level 2 discards the weights (generating before a full sync is an error), level 1
  keeps them; generate needs weights and KV cache awake.
- generate: each prompt's completions depend on its request's seed only ("<think>...</think> \\boxed{d}" with d
  drawn from the seed, then <|im_end|>), log-prob -0.5 per token.

- Out of memory on demand: $VLMFAST_VLLM_OOM="start" raises the error vLLM 0.32's GPU worker raises when the
  free memory at start is below its share (v1/worker/gpu_worker.py, `init_device`); "wake" raises torch's
  OutOfMemoryError from the first wake-up, as the cumem allocator's failure surfaces.

Events go to $VLMFAST_EVENTS/rank<RANK>.jsonl (one JSON object a line) and to `EVENTS` in this process.
"""

from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

__version__ = "0.32.0"
EVENTS: list[dict] = []


def record(kind: str, **info) -> None:
    event = {"kind": kind, **info}
    EVENTS.append(event)
    folder = os.environ.get("VLMFAST_EVENTS")
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")


class EngineArgs:  # only its signature is read
    def __init__(self, model=None, dtype=None, seed=None, max_model_len=None, enforce_eager=None,
                 enable_sleep_mode=None, worker_extension_cls=None, logprobs_mode=None, gpu_memory_utilization=None,
                 distributed_executor_backend=None, tensor_parallel_size=None, load_format=None):
        pass


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Part:
    def __init__(self, name):
        self.name = name

    def shutdown(self):
        record("shutdown", part=self.name)


class InprocClient:
    """vLLM's in-process engine-core client (the class name vlmfast checks). Its shutdown, which vLLM runs when
    the client is collected too, ends in cleanup_dist_env_and_memory(): the trainer's process group destroyed."""

    def __init__(self):
        self.engine_core = SimpleNamespace(model_executor=_Part("executor"), scheduler=_Part("scheduler"))

    def shutdown(self):
        record("shutdown", part="engine core: torch.distributed's default group destroyed")


class LLM:
    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        if os.environ.get("VLMFAST_VLLM_OOM") == "start":
            share = kwargs.get("gpu_memory_utilization", 0.9)
            raise ValueError(f"Free memory on device cuda:0 (31.2/79.1 GiB) on startup is less than desired GPU "
                             f"memory utilization ({share}, {share * 79.1:.1f} GiB). Decrease GPU memory utilization "
                             "or reduce GPU memory used by other processes.")
        local = os.environ.get("LOCAL_RANK", "0") if kwargs.get("distributed_executor_backend") == "external_launcher" \
            else "0"
        self.worker = SimpleNamespace(device=f"cuda:{local}")
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        self.llm_engine = SimpleNamespace(engine_core=InprocClient())
        self.awake = {"weights", "kv_cache"}
        self.weights_valid = kwargs.get("load_format") != "dummy"
        self.synced: set[str] = set()
        record("LLM", **{k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, dict))})

    def _state(self) -> dict:
        return {"awake": sorted(self.awake)}

    def collective_rpc(self, method, args=()):
        if callable(method):
            return [method(self.worker)]
        if method != "vlmfast_load_weights":
            raise NotImplementedError(method)
        if "weights" not in self.awake:
            raise RuntimeError("weights loaded into an engine whose weights sleep")
        (bucket,) = args
        self.synced.update(name for name, _ in bucket)
        self.weights_valid = True
        record("sync", tensors=len(bucket), names=[n for n, _ in bucket], **self._state())
        return ["recorded"]

    def reset_prefix_cache(self):
        record("reset_prefix_cache", **self._state())

    def sleep(self, level: int = 1):
        record("sleep", level=level, **self._state())
        self.awake = set()
        if level == 2:
            self.weights_valid, self.synced = False, set()

    def wake_up(self, tags=None):
        tags = list(tags or ["weights", "kv_cache"])
        if os.environ.get("VLMFAST_VLLM_OOM") == "wake":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 79.10 GiB of which 3.02 GiB is free.")
        record("wake_up", tags=tags, **self._state())
        self.awake |= set(tags)

    def generate(self, prompts, params, use_tqdm=False):
        if self.awake != {"weights", "kv_cache"}:
            raise RuntimeError(f"generate with only {sorted(self.awake)} awake")
        if not self.weights_valid:
            raise RuntimeError("generate on discarded (level-2 sleep) or dummy weights: no sync since")
        params = params if isinstance(params, list) else [params] * len(prompts)
        record("generate", prompts=len(prompts), seeds=[p.seed for p in params], n=[p.n for p in params],
               **self._state())
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        outs = []
        for p in params:
            rng = random.Random(p.seed)
            completions = []
            for _ in range(p.n):
                text = f"<think>count</think> \\boxed{{{rng.randint(0, 4)}}}"
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: p.max_tokens - 1] + [eos]
                lps = [{t: SimpleNamespace(logprob=-0.5)} for t in ids]
                completions.append(SimpleNamespace(token_ids=ids, logprobs=lps))
            outs.append(SimpleNamespace(outputs=completions))
        return outs
