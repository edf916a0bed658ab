"""A LoRA policy's rollout step in vLLM, two ways, side by side in one run (vLLM's venv: `make bench-lora-sync`, or
`.venv-vllm/bin/python -m bench.lora_sync`):

- merged (vlmfast's default): after each update the engine is sent the adapted layers merged, W + (alpha / r) B A
  (weight_sync.weight_buckets over lora.served_tensors), then generates with plain weights.
- vLLM LoRA: the engine holds the base model with `enable_lora`; after each update the adapters are written in PEFT
  format and the next generate passes a new `LoRARequest`, which vLLM loads before it decodes with its LoRA
  (punica) kernels.

Per step: the adapters move, the sync (merged: the weights; LoRA: the adapter files), then a seeded generate of
8 prompts x 4 samples x 32 tokens (vLLM loads a new adapter inside it). Qwen2 text models of about 10 MB and
200 MB in fp32 with rank-16 adapters on every projection of every layer; the median of --repeats steps after a
warm-up. Both ways are checked to sample from the same distribution (their log-probs of the same tokens agree).
Rows go to bench/results/lora_sync.jsonl, the table to lora_sync.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

from .weight_sync import SIZES, _model, vllm_environment, write_results

PROMPTS = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3))]
LORA = SimpleNamespace(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear", vision="frozen",
                       projector="frozen", modules_to_save=[], handoff="merged")
MODES = ("merged", "vLLM LoRA")


def _move(model, step: int) -> None:
    import torch

    from vlmfast.lora import lora_layers

    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def _adapted(base):
    """A copy of `base` with the bench's adapters, the same start in both ways (their A is drawn from torch's
    generator)."""
    import copy

    import torch

    from vlmfast.lora import apply_lora

    torch.manual_seed(0)
    return apply_lora(copy.deepcopy(base), LORA)


def _steps(sync, generate, model, repeats: int) -> dict:
    """Median seconds of the sync and of the generate over `repeats` steps (after one warm-up step), and the
    last step's samples."""
    times = {"sync": [], "generate": []}
    for step in range(repeats + 1):
        _move(model, step)
        t0 = time.perf_counter()
        sync(step)
        t1 = time.perf_counter()
        out = generate(step)
        t2 = time.perf_counter()
        if step:
            times["sync"].append(t1 - t0)
            times["generate"].append(t2 - t1)
    return {k: statistics.median(v) for k, v in times.items()} | {"samples": out}


def _agreement(outs_a, outs_b) -> tuple[float, float]:
    """(the largest log-prob difference of the tokens both ways sampled alike, each completion up to where they part;
    the share of completions sampled identically). Sampling with the same seed draws the same tokens while the two
    distributions agree to rounding: two ways that apply different adapters part at once, by O(1) log-probs."""
    gap, same, n = 0.0, 0, 0
    for oa, ob in zip(outs_a, outs_b):
        for ca, cb in zip(oa.outputs, ob.outputs):
            n += 1
            same += list(ca.token_ids) == list(cb.token_ids)
            for ta, tb, sa, sb in zip(ca.token_ids, cb.token_ids, ca.logprobs, cb.logprobs):
                if ta != tb:
                    break
                gap = max(gap, abs(sa[ta].logprob - sb[tb].logprob))
    return gap, same / max(n, 1)


def _merged(base, tok, sampling, kw, repeats: int) -> dict:
    """vlmfast's way: the engine is sent the adapted layers merged after each update."""

    from vlmfast.rollout.vllm_engine import VLLMEngine

    model = _adapted(base)
    engine = VLLMEngine.from_model(model, tok, **kw)
    prompts, params = [engine._prompt(p, []) for p in PROMPTS], engine._params(4, sampling)
    try:
        out = _steps(lambda step: engine.sync_weights(model),
                     lambda step: engine.llm.generate(prompts, params, use_tqdm=False), model, repeats)
        return {**out, "sent": engine.last_sync["bytes"]}
    finally:
        engine.close()


def _vllm_lora(base, tok, sampling, kw, repeats: int) -> dict:
    """vLLM's way: the engine holds the base; each update's adapters are written and passed as a new LoRARequest."""

    from vllm.lora.request import LoRARequest

    from vlmfast.lora import save_adapters
    from vlmfast.rollout.vllm_engine import VLLMEngine

    model = _adapted(base)
    engine = VLLMEngine.from_model(base, tok, enable_lora=True, max_lora_rank=LORA.r, max_loras=1, **kw)
    prompts, params = [engine._prompt(p, []) for p in PROMPTS], engine._params(4, sampling)
    folder = tempfile.mkdtemp(prefix="vlmfast-bench-lora-")

    def write_adapters(step):
        state = {n: p.detach() for n, p in model.named_parameters()}
        save_adapters(model, state, os.path.join(folder, f"step{step}"), base=None)

    def generate(step):
        request = LoRARequest(f"step{step}", step + 1, os.path.join(folder, f"step{step}"))
        return engine.llm.generate(prompts, params, lora_request=request, use_tqdm=False)

    try:
        out = _steps(write_adapters, generate, model, repeats)
    finally:
        engine.close()
    last = os.path.join(folder, f"step{repeats}")
    return {**out, "sent": sum(os.path.getsize(os.path.join(last, f)) for f in os.listdir(last))}


def measure(size: str, repeats: int) -> list[dict]:
    import torch

    from vlmfast.rollout import Sampling

    base, tok = _model(*SIZES[size])
    sampling = Sampling(temperature=1.0, max_new_tokens=32, seed=0)
    kw = dict(dtype="float32", enforce_eager=True, max_model_len=256)
    rows = {"merged": _merged(base, tok, sampling, kw, repeats)}
    gc.collect()
    rows["vLLM LoRA"] = _vllm_lora(base, tok, sampling, kw, repeats)
    gc.collect()
    # the same adapters and seeds: the two engines sample the same tokens with the same log-probs (fp32, to rounding)
    gap, same = _agreement(rows["merged"]["samples"], rows["vLLM LoRA"]["samples"])
    mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    merged_total = rows["merged"]["sync"] + rows["merged"]["generate"]
    out = []
    for mode in MODES:
        r = rows[mode]
        total = r["sync"] + r["generate"]
        out.append({"model": size, "model_mb": mb, "mode": mode, "sync_s": r["sync"], "generate_s": r["generate"],
                    "step_s": total, "vs_merged": total / merged_total, "logprob_gap": gap, "same_samples": same,
                    "sync_bytes": r["sent"], "threads": torch.get_num_threads()})
    return out


def _table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"# A LoRA policy's rollout step in vLLM: merged weights vs vLLM's LoRA adapters (measured "
             f"{r0['timestamp']}, cpu ({r0['threads']} torch threads), vllm {r0['vllm']}, torch {r0['torch']})", "",
             "Qwen2 text models in fp32, rank-16 adapters on every projection; per step: the adapters move, the sync, "
             "a seeded generate of 8 prompts x 4 samples x 32 tokens; medians (`python -m bench.lora_sync` in vLLM's "
             "venv). `sent`: bytes of the merged layers, or of the adapter files. `logprob gap`: the largest "
             "difference of the two ways' log-probs of the tokens both sampled alike (each completion up to where "
             "they part); `same`: the share of the last step's 32 completions the two sampled identically.", "",
             "| model | mode | sync ms | generate ms | step ms | vs merged | sent MB | logprob gap | same |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model_mb']:.0f} MB | {r['mode']} | {r['sync_s'] * 1e3:.1f} | {r['generate_s'] * 1e3:.1f} | "
              f"{r['step_s'] * 1e3:.1f} | {r['vs_merged']:.2f}x | {r['sync_bytes'] / 2**20:.2f} | "
              f"{r['logprob_gap']:.1e} | {r['same_samples']:.0%} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lora_sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env = vllm_environment()
    write_results("lora_sync", [{**r, **env} for size in SIZES for r in measure(size, args.repeats)], _table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
