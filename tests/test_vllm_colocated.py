"""Colocated vLLM as 8 GPUs run it, reached on the CPU through a recording stand-in for `vllm` (tests/stand_ins/vllm)
and for torch.cuda: each rank's engine on its own device (external_launcher, a seed per rank, the device checked),
its model folder per node and per run, and the memory lifecycle around every generation (empty_cache -> wake
weights -> sync -> wake KV cache -> generate -> sleep -> empty_cache) with no forward of any model while it is
awake; a level-2 sleep resends every weight; each stage's engine freed before the next builds its own. The real
trainer runs (GRPO with evaluations, then CW-DPO) in one process and on 2 ranks under ZeRO-3 with every
parameter partitioned, where every rank evaluates half the problems and the records equal one process's."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _launch import clean_env, free_port

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "train_recorded.py"


@pytest.fixture
def stand_in_vllm(monkeypatch):
    spec = importlib.util.spec_from_file_location("vllm", HERE / "stand_ins" / "vllm" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


class RecordingCuda:
    """torch.cuda as a rank of an 8-GPU node sees it: available, `current` as the current device."""

    def __init__(self, current: int, log: list):
        self.current, self.log = current, log

    def is_available(self):
        return True

    def current_device(self):
        return self.current

    def empty_cache(self):
        self.log.append({"kind": "empty_cache"})


def _one_rank_world():
    if not torch.distributed.is_initialized():
        from vlmfast.train import _init_distributed

        _init_distributed("cpu")


def test_each_rank_builds_its_engine_on_its_own_device(stand_in_vllm, monkeypatch, tmp_path):
    """As rank 1 of a node (LOCAL_RANK 1): vLLM gets the external_launcher executor and the rank's seed, and the
    engine's worker lands on cuda:1. The in-process executor's placement (cuda:0, what vLLM does without it) and
    a current device left on another GPU are refused by name."""
    import tempfile

    from vlmfast.models import tiny_vlm
    from vlmfast.rollout import vllm_engine
    from vlmfast.rollout.vllm_engine import VLLMEngine, check_placement

    _one_rank_world()
    model, proc = tiny_vlm("student", seed=0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(vllm_engine, "run_id", lambda: "run")
    vllm_engine.model_folder(model, proc, "policy")  # as the node's LOCAL_RANK 0 writes it
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 8)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    engine = VLLMEngine.from_model(model, proc, cuda=RecordingCuda(1, []), sleep_mode=True)
    kw = engine.llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["seed"] == 1
    assert kw["tensor_parallel_size"] == 1 and engine.llm.worker.device == "cuda:1"
    with pytest.raises(RuntimeError, match="LOCAL_RANK=1 landed on cuda:0"):
        check_placement(["cuda:0"], 1, 1)
    with pytest.raises(RuntimeError, match="current CUDA device is 0, not LOCAL_RANK=1"):
        check_placement(["cuda:1"], 0, 1)
    with pytest.raises(RuntimeError, match="current CUDA device is 0"):
        VLLMEngine.from_model(model, proc, cuda=RecordingCuda(0, []))
    engine.close()


def test_awake_runs_the_lifecycle_in_order_and_level_2_resends_every_weight(stand_in_vllm):
    from vlmfast.models import tiny_vlm
    from vlmfast.rollout import Sampling
    from vlmfast.rollout.vllm_engine import VLLMEngine

    model, proc = tiny_vlm("student", seed=0)
    model.model.visual.requires_grad_(False)  # a frozen part: a level-2 sleep loses it too
    log = stand_in_vllm.EVENTS
    engine = VLLMEngine.from_model(model, proc, cuda=RecordingCuda(0, log), sleep_mode=True)
    log.clear()
    with engine.awake(model, stale=True) as e:
        e.generate(["How many squares?"], [[]], n=2, sampling=Sampling(max_new_tokens=8, seed=1))
    kinds = [x["kind"] for x in log]
    syncs = [x for x in log if x["kind"] == "sync"]
    assert kinds == ["empty_cache", "wake_up", *["sync"] * len(syncs), "reset_prefix_cache", "wake_up", "generate",
                     "sleep", "empty_cache"]
    assert [x["tags"] for x in log if x["kind"] == "wake_up"] == [["weights"], ["kv_cache"]]
    assert all(x["awake"] == ["weights"] for x in syncs)  # the KV cache is not allocated during the sync
    assert sum(x["tensors"] for x in syncs) == len(list(model.parameters()))  # frozen ones included
    assert [x["level"] for x in log if x["kind"] == "sleep"] == [2]
    log.clear()
    with engine.awake(model, stale=True):
        pass
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(x["tensors"] for x in log if x["kind"] == "sync") == len(list(model.parameters())) > trainable
    VLLMEngine.from_model(model, proc, role="teacher", cuda=RecordingCuda(0, log), sleep_mode=True, sleep_level=1)
    assert [x["level"] for x in log if x["kind"] == "sleep"][-1] == 1


NODE = """
import json, os, sys, tempfile
import torch
torch.distributed.init_process_group("gloo")
from vlmfast.models import tiny_vlm
from vlmfast.rollout.vllm_engine import model_folder
model, proc = tiny_vlm("student", seed=0)
folders = [str(model_folder(model, proc, role)) for role in ("policy", "teacher")]
print(json.dumps({"folders": folders, "files": sorted(os.listdir(folders[0]))}))
torch.distributed.destroy_process_group()
"""


def _two_nodes(tmp: Path) -> list[dict]:
    """A 2-rank world where each rank is a node of its own: LOCAL_RANK 0 on both, each its own TMPDIR."""
    port = free_port()
    procs = []
    for rank in range(2):
        node = tmp / f"node{rank}"
        node.mkdir(parents=True)
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), TMPDIR=str(node))
        procs.append(subprocess.Popen([sys.executable, "-c", NODE], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


@pytest.mark.multirank
def test_model_folder_per_node_and_per_run(tmp_path):
    """Two nodes: each node's folder is written on that node, named by the run's id (rank 0's, broadcast: the
    same on both ranks) and the engine's role, and removed when the process exits; a second run gets another."""
    names = []
    for run in ("run0", "run1"):
        seen = _two_nodes(tmp_path / run)
        for rank, s in enumerate(seen):
            assert all(f.startswith(str(tmp_path / run / f"node{rank}")) for f in s["folders"])
            assert "config.json" in s["files"] and "tokenizer.json" in s["files"]
            assert not any(os.path.exists(f) for f in s["folders"])  # removed at exit
        ranks = [[Path(f).name for f in s["folders"]] for s in seen]
        assert ranks[0] == ranks[1] and ranks[0][0] != ranks[0][1]  # one id per run, one folder per role
        names.append(ranks[0])
    assert names[0] != names[1]


STAGES = [{"type": "grpo", "name": "grpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "group_size": 4,
           "max_new_tokens": 12, "kl_coef": 0.05, "advantage_scale": "batch", "engine": "vllm"},
          {"type": "cw_dpo", "name": "cwdpo", "steps": 1, "lr": 1e-3, "batch_size": 2, "on_policy_fraction": 1.0,
           "max_new_tokens": 12, "engine": "vllm"}]


def _recipe(tmp_path, name, zero, tp=1, offload=False):
    raw = {"run": {"name": name, "out_dir": str(tmp_path), "threads": 1, "checkpoint_every": 100},
           "model": {"path": "tiny:student"}, "data": {"synthetic": {"train": 32, "val": 6, "ood": 4}},
           "deepspeed": {"zero_stage": zero, **({"stage3_param_persistence_threshold": 0} if zero == 3 else {})},
           "eval": {"every": 1, "num_problems": 5, "n_samples": 2, "k": [1, 2], "max_new_tokens": 12, "probes": 2,
                    "at_start": True},
           "vllm": {"sleep_mode": "on", "tensor_parallel_size": tp, "offload_optimizer": offload}, "stages": STAGES}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(tmp_path, name, ranks: int, zero: int, tp: int = 1, offload: bool = False):
    events = tmp_path / f"{name}-events"
    events.mkdir()
    env = clean_env(VLMFAST_EVENTS=str(events), DS_ACCELERATOR="cpu")
    cfg = ["--config", str(_recipe(tmp_path, name, zero, tp, offload))]
    cmd = ([sys.executable, str(SCRIPT), *cfg] if ranks == 1 else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            str(SCRIPT), *cfg])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    logs = [[json.loads(x) for x in (events / f"rank{r}.jsonl").read_text().splitlines()] for r in range(ranks)]
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return logs, records


def _check_lifecycle(log: list, n_params: int, offload: bool = False) -> None:
    """Every generation inside empty_cache -> wake weights -> full sync -> wake KV cache ... sleep(2) ->
    empty_cache (with `offload`: DeepSpeed's optimizer states offloaded before, reloaded after); no forward
    while awake; each stage's engine shut down before the next stage's is built."""
    awake, wakes = False, 0
    assert sum(e["kind"] == "offload_states" for e in log) == sum(e["kind"] == "reload_states" for e in log) == \
        (sum(e["kind"] == "wake_up" and e["tags"] == ["weights"] for e in log) if offload else 0)
    for i, e in enumerate(log):
        k = e["kind"]
        if k == "forward":
            assert not awake, f"a forward (grad={e['grad']}) while vLLM is awake (event {i})"
        elif k == "wake_up" and e["tags"] == ["weights"]:
            assert log[i - 1]["kind"] == "empty_cache" and not awake
            assert not offload or log[i - 2]["kind"] == "offload_states"
            j = i + 1
            while log[j]["kind"] == "sync":
                j += 1
            assert sum(x["tensors"] for x in log[i + 1 : j]) == n_params  # level 2 lost them all
            assert [x["kind"] for x in log[j : j + 2]] == ["reset_prefix_cache", "wake_up"]
            assert log[j + 1]["tags"] == ["kv_cache"]
            awake, wakes = True, wakes + 1
        elif k == "wake_up" and e["tags"] == ["kv_cache"]:
            assert awake  # right after the sync (checked above)
        elif k == "generate":
            assert awake and e["awake"] == ["kv_cache", "weights"]
        elif k == "sleep" and log[i - 1]["kind"] == "LLM":  # built, then asleep before the trainer goes on
            assert e["level"] == 2
        elif k == "sleep":
            assert awake and e["level"] == 2 and log[i + 1]["kind"] == "empty_cache"
            assert not offload or log[i + 2]["kind"] == "reload_states"
            awake = False
        elif k == "wake_up":
            raise AssertionError(f"a wake of {e['tags']} outside the lifecycle (event {i})")
    assert not awake and wakes >= 4  # GRPO: evaluations and rollouts; CW-DPO: its evaluations and negatives
    built = [i for i, e in enumerate(log) if e["kind"] == "LLM"]
    shut = [i for i, e in enumerate(log) if e["kind"] == "shutdown" and e["part"] == "executor"]
    assert len(built) == 2 and len(shut) == 2 and built[0] < shut[0] < built[1] < shut[1]
    # under a launcher the engine core's own shutdown would destroy the trainer's process group
    assert not [e for e in log if e["kind"] == "shutdown" and e["part"] not in ("executor", "scheduler")]


def _n_params():
    from vlmfast.models import tiny_vlm

    return len(list(tiny_vlm("student", seed=0)[0].parameters()))


def test_trainer_keeps_the_lifecycle_in_one_process(tmp_path):
    (log,), records = _train(tmp_path, "one", 1, 0)
    _check_lifecycle(log, _n_params())
    assert any(e["kind"] == "forward" and e["grad"] for e in log)
    assert {r["stage"] for r in records if r["kind"] == "train"} == {"grpo", "cwdpo"}
    # vllm.max_model_len not given: the longest prompt of the data plus the longest response (12 tokens)
    from vlmfast.config import load_config
    from vlmfast.data.budget import prompt_lengths
    from vlmfast.data.loading import load_data
    from vlmfast.models import tiny_vlm

    data = load_data(load_config(_recipe(tmp_path, "one", 0)))
    proc = tiny_vlm("student", seed=0)[1]
    longest = max(max(prompt_lengths(proc, v)) for v in data.values())
    assert {e["max_model_len"] for e in log if e["kind"] == "LLM"} == {longest + 12}


def test_a_budget_too_small_for_the_data_exits_2_before_the_run_starts(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--config", str(_recipe(tmp_path, "small", 0)),
                          "vllm.max_model_len=20"], capture_output=True, text=True, timeout=300, env=clean_env())
    assert res.returncode == 2, res.stderr[-2000:]
    assert "config error: vllm.max_model_len: 20 tokens leave 0 of 32 'train' prompts" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "small").exists()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if k.startswith("timing/") or k in ("step_time_s", "tokens_per_s", "peak_mem_mb", "pass_curves", "rank_tokens",
                                            "rank_tokens_max"):  # per rank: half the tokens on each of 2
            continue
        if isinstance(v, float):
            assert v == pytest.approx(b[k], rel=1e-4, abs=1e-5, nan_ok=True), k
        else:
            assert v == b[k], k


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.timeout(1200)
def test_two_ranks_zero3_shard_the_evaluation_and_match_one_process(tmp_path):
    """The deepspeed launcher, 2 CPU ranks, ZeRO-3 with every parameter partitioned, an engine per rank through
    external_launcher (seed = rank): each rank generates for 3 of the 5 problems of a split (one padded), yet
    every evaluation record, and GRPO's (advantages scaled by the whole batch's spread) and CW-DPO's train
    records, equal one process's. With vllm.tensor_parallel_size 2 both ranks run one engine: each submits the
    group's prompts (gathered) with the group's seed, and keeps its own results: the same records again. With
    vllm.offload_optimizer DeepSpeed's optimizer states leave before every wake and return after every sleep,
    and the training is unchanged."""
    _, single = _train(tmp_path, "one", 1, 0)
    for tp, offload in ((1, True), (2, False)):
        logs, double = _train(tmp_path, f"two-tp{tp}", 2, 3, tp, offload)
        for rank, log in enumerate(logs):
            _check_lifecycle(log, _n_params(), offload)
            llm = [e for e in log if e["kind"] == "LLM"]
            assert all(e["distributed_executor_backend"] == "external_launcher" and e["seed"] == rank // tp
                       and e["tensor_parallel_size"] == tp for e in llm)
            # 5 val and 4 ood problems greedy, 2 probes, on 3 + 2 (of 5 and 4) each: never the whole split
            first_eval = [e["prompts"] for e in log if e["kind"] == "generate"][:5]
            assert first_eval == [3 * tp, 3 * tp, 2 * tp, 2 * tp, 2 * tp], first_eval
        assert len(single) == len(double)
        for a, b in zip(single, double):
            assert (a["kind"], a["stage"], a["step"]) == (b["kind"], b["stage"], b["step"])
            _close(a, b)


@pytest.mark.parametrize("when,says", [("start", "creating its engine (ValueError: Free memory on device"),
                                       ("wake", "waking its weights (OutOfMemoryError: CUDA out of memory")])
def test_vllm_out_of_memory_stops_the_run_naming_the_key(tmp_path, when, says):
    """vLLM's free-memory check at start (its share of the GPU is more than the trainer left) and an out-of-memory
    at a wake: the run stops with exit 1 and a message naming the recipe key of that share, no traceback."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--config", str(_recipe(tmp_path, when, 0))],
                         capture_output=True, text=True, timeout=600, env=clean_env(VLMFAST_VLLM_OOM=when))
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"stopped: vLLM ran out of GPU memory {says}" in res.stderr
    assert "Its share of each GPU is stages[0].vllm_memory_share=0.5" in res.stderr
    assert "Traceback" not in res.stderr


def test_other_engine_errors_are_not_called_memory_errors():
    from vlmfast.rollout.vllm_engine import VLLMMemoryError, memory_errors_named

    with pytest.raises(ValueError, match="unknown architecture"), memory_errors_named("creating", "k=1"):
        raise ValueError("unknown architecture Foo")
    with pytest.raises(VLLMMemoryError, match="k=1"), memory_errors_named("creating", "k=1"):
        raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`")


def test_seeded_prompts_never_share_a_sample_stream(stand_in_vllm):
    """vLLM seeds a request's n samples seed, seed + 1, ... (parallel_sampling.py): the engine spreads the per-prompt
    seeds (consecutive, by each prompt's place) n apart, so no two samples of a batch draw from one stream."""
    from vlmfast.models import tiny_vlm
    from vlmfast.rollout import Sampling
    from vlmfast.rollout.vllm_engine import VLLMEngine

    model, proc = tiny_vlm("student", seed=0)
    engine = VLLMEngine.from_model(model, proc, cuda=RecordingCuda(0, stand_in_vllm.EVENTS))
    stand_in_vllm.EVENTS.clear()
    with engine.awake(model, stale=True) as e:
        e.generate(["a?", "b?", "c?"], [[], [], []], n=4, sampling=Sampling(max_new_tokens=4), seeds=[10, 11, 12])
    (gen,) = [x for x in stand_in_vllm.EVENTS if x["kind"] == "generate"]
    streams = [seed + j for seed, n in zip(gen["seeds"], gen["n"]) for j in range(n)]  # what vLLM's children get
    assert len(set(streams)) == len(streams) == 12
