"""Methods added to every vLLM worker (`worker_extension_cls`): load new weights in place.

Tensors passed as RPC arguments arrive as lists, so the engine sends a safetensors file path.
"""

from __future__ import annotations


class WeightSyncExtension:
    def vlmfast_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path, device=str(self.device) if hasattr(self, "device") else "cpu")
        self.model_runner.model.load_weights(weights=weights.items())
        return len(weights)
