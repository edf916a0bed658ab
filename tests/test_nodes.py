"""Before a run on several nodes starts: every rank proves it sees rank 0's run.out_dir (two "nodes" as two
processes, each with its own working directory: a relative out_dir is then a node-local disk, and both ranks stop
naming it), and hub models and datasets are fetched by each node's LOCAL_RANK 0 while the node's other ranks wait."""

import json
import subprocess
import sys

import pytest
from _launch import clean_env, free_port

from vlmfast.config import load_config
from vlmfast.nodes import fetch_once_per_node, hub_datasets, hub_models

NODE = """
import json, sys, torch
torch.distributed.init_process_group("gloo")
from vlmfast.config import ConfigError
from vlmfast.nodes import check_shared_out_dir
try:
    check_shared_out_dir(sys.argv[1])
    print(json.dumps({"ok": True}))
except ConfigError as e:
    print(json.dumps({"ok": False, "error": str(e)}))
torch.distributed.destroy_process_group()
"""


def _two_nodes(tmp_path, out_dir: str) -> list[dict]:
    port, procs = free_port(), []
    for rank in range(2):
        node = tmp_path / f"node{rank}"
        node.mkdir(exist_ok=True)
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), TMPDIR=str(node))
        procs.append(subprocess.Popen([sys.executable, "-c", NODE, out_dir], env=env, cwd=node,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [json.loads(o[0].strip().splitlines()[-1]) for o in outs]


@pytest.mark.multirank
def test_every_rank_must_see_rank_0s_out_dir(tmp_path):
    shared = _two_nodes(tmp_path, str(tmp_path / "runs"))  # one absolute path: the same directory on both
    assert shared == [{"ok": True}, {"ok": True}]
    assert not [p for p in (tmp_path / "runs").iterdir()]  # the nonce file is gone
    local = _two_nodes(tmp_path, "runs")  # relative: each node's own ./runs
    assert [r["ok"] for r in local] == [False, False]
    assert all("run.out_dir=runs is not one directory for every rank: rank 1 on" in r["error"] for r in local)


def test_hub_downloads_happen_on_each_nodes_local_rank_0(tmp_path, monkeypatch):
    (tmp_path / "train.parquet").write_text("")
    cfg = load_config(raw={"model": {"path": "Qwen/Qwen2.5-VL-7B-Instruct"},
                           "data": {"train": str(tmp_path / "train.parquet"), "val": "hiyouga/geometry3k:validation",
                                    "eval_splits": {"test": "hiyouga/geometry3k:test"}},
                           "stages": [{"type": "sft"}, {"type": "opd", "teacher": "Qwen/Qwen2.5-VL-32B-Instruct"}]})
    assert hub_models(cfg) == ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-32B-Instruct"]
    assert hub_datasets(cfg) == ["hiyouga/geometry3k:validation", "hiyouga/geometry3k:test"]
    got = []
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        got.append(fetch_once_per_node(cfg, download_model=lambda n: None, download_dataset=lambda s: None))
    assert got == [hub_models(cfg) + hub_datasets(cfg), []]
    tiny = load_config(raw={"model": {"path": "tiny:student"}, "data": {"synthetic": {}}, "stages": [{"type": "sft"}]})
    assert hub_models(tiny) == [] and hub_datasets(tiny) == []


def test_a_name_neither_here_nor_on_the_hub_is_a_config_error(monkeypatch):
    """A misspelled local folder reads as a hub name: the download's failure (offline here) names it, exit 2."""
    from vlmfast.config import ConfigError

    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = load_config(raw={"model": {"path": "mymodel_dir"}, "data": {"synthetic": {}}, "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match=r"mymodel_dir: no such file or folder here, and not fetched from the hub"):
        fetch_once_per_node(cfg)
