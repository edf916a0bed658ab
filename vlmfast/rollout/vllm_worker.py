"""Methods added to every vLLM worker (`worker_extension_cls`): load new weights in place, without files.

- `vlmfast_load_weights(bucket)`: an engine in the trainer's process receives [(name, tensor)] by
  reference (vLLM's in-process executor calls it directly) and copies them once: vLLM's `load_weights` the
  first time a bucket's layout comes, a replay of the copies it made every later time (`load_plan.py`;
  `VLMFAST_SYNC_REPLAY=0` turns the replay off).
- `vlmfast_load_shared(handle, layout)`: an engine in another process (RPC arguments are serialised)
  maps the trainer's shared buffer once (CUDA IPC or shared memory) and loads views of it.

On the CPU, vLLM repacks every linear weight for its GEMM and empties the parameter (shape [0]): weights
loaded in place afterwards would be dropped or fail. vLLM imports this module in each worker process
before it loads the model, so the plain `F.linear` set up here is what every vlmfast engine runs on a CPU.
"""

from __future__ import annotations

import os


def _plain_cpu_linear() -> None:
    try:
        from vllm.model_executor.layers import utils
        from vllm.platforms import current_platform
    except ImportError:
        return
    if current_platform.is_cpu() and hasattr(utils, "dispatch_cpu_unquantized_gemm"):
        import torch.nn.functional as F

        def dispatch(layer, remove_weight: bool) -> None:  # keep the weight: syncs load into it
            layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

        utils.dispatch_cpu_unquantized_gemm = dispatch


_plain_cpu_linear()


class WeightSyncExtension:
    def vlmfast_load_weights(self, bucket: list) -> str:
        """Returns how the bucket was loaded: "recorded", "replayed" or "load_weights"."""
        model = self.model_runner.model
        if os.environ.get("VLMFAST_SYNC_REPLAY", "1") == "0":
            model.load_weights(weights=bucket)
            return "load_weights"
        plan = self.__dict__.get("_vlmfast_plan")
        if plan is None or plan.model is not model:
            from vlmfast.rollout.load_plan import LoadPlan

            plan = self._vlmfast_plan = LoadPlan(model)
        plan.load(bucket)
        return plan.last

    def vlmfast_load_shared(self, handle: bytes, layout: list) -> str:
        from vlmfast.rollout.weight_sync import open_shared, unpack

        buffers = self.__dict__.setdefault("_vlmfast_buffers", {})
        if handle not in buffers:  # mapped once, reused by every later sync
            buffers[handle] = open_shared(handle)
        return self.vlmfast_load_weights(unpack(buffers[handle], layout))
