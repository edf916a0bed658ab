"""One rank of a `torchrun --nproc_per_node 2` launch (tests_vllm/test_engine_per_rank.py): a real vLLM engine per
rank through external_launcher, built from the trainer's model (dummy start, first sync from memory); the
evaluation's generations sharded over the ranks and gathered; a weight sync; greedy after it. Writes what it saw
to <out>/rank<RANK>.json.

    torchrun --nproc_per_node 2 engine_per_rank.py <tiny model folder> <out folder>
"""

import json
import os
import sys
import tempfile

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from vlmfast.evaluate import eval_generations, eval_seeds
from vlmfast.ranks import gathered_in_order, shard
from vlmfast.rollout import Sampling
from vlmfast.rollout.vllm_engine import VLLMEngine

PROBLEMS = ["How many red shapes are in the image?", "What is the colour of the largest shape?",
            "How many squares are there?", "Count the circles.", "Which colour is most common?"]


class Example:
    def __init__(self, problem):
        self.problem, self.images = problem, []


def _rank_caches(rank: int) -> None:
    """Each rank its own cache folders (vLLM and inductor write there), before vLLM is imported."""
    cache = tempfile.mkdtemp(prefix=f"vlmfast-vllm-rank{rank}-")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for var in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ[var] = os.path.join(cache, var.lower())
        os.makedirs(os.environ[var], exist_ok=True)


def main(model_path: str, out: str) -> None:
    rank = int(os.environ["RANK"])
    _rank_caches(rank)
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    model = Qwen2ForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    engine = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    examples = [Example(p) for p in PROBLEMS]
    idx, real = shard(len(examples), rank, world)
    seeds = eval_seeds(5, len(examples))
    mine = [examples[i] for i in idx]
    greedy, groups = eval_generations(engine, mine, mine, n_samples=2, temperature=1.0, max_new_tokens=8,
                                      seeds=[seeds[i] for i in idx])
    all_greedy = gathered_in_order([c.token_ids for c in greedy[:real]], idx[:real], len(examples))
    all_groups = gathered_in_order([[c.token_ids for c in g] for g in groups[:real]], idx[:real], len(examples))
    torch.manual_seed(1)  # the same update on every rank, as after an optimizer step
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with engine.awake(model, stale=True):
        after = engine.generate(PROBLEMS[:2], [[], []], n=1, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    result = {"rank": rank, "kwargs": {k: engine.llm_kwargs.get(k) for k in ("distributed_executor_backend", "seed")},
              "prompts": len(idx), "greedy": all_greedy, "groups": all_groups, "sync": engine.last_sync,
              "after": [g[0].token_ids for g in after]}
    engine.close()  # as at a stage's end: the trainer's process group survives it, and the next stage's engine
    again = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    result["next_stage"] = [g[0].token_ids for g in again.generate(PROBLEMS[:2], [[], []], n=1, sampling=Sampling(
        temperature=0.0, max_new_tokens=8))]
    ones = torch.ones(1)
    torch.distributed.all_reduce(ones)
    result["world_after_close"] = ones.item()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    again.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
