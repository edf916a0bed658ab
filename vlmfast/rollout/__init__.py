"""Generation engines behind one small interface (see base.py): "hf" (transformers generate on the
training model, CPU and GPU) and "vllm" (colocated vLLM, GPU; a tiny text model on CPU in tests)."""

from .base import Completion, Sampling, mismatch
from .hf import HFEngine

ENGINES = ("hf", "vllm")


def make_engine(name: str, model, processor, **kwargs):
    """An engine for `model` (the HF engine samples from it; vLLM loads its weights and syncs)."""
    if name == "hf":
        return HFEngine(model, processor, **kwargs)
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine.from_model(model, processor, **kwargs)
    raise ValueError(f"unknown engine {name!r}; choose from {ENGINES}")


__all__ = ["Completion", "ENGINES", "HFEngine", "Sampling", "make_engine", "mismatch"]
