"""Two "nodes" on this machine, as a cluster launches them: two `torchrun --nnodes 2 --node_rank 0/1` invocations
(one rank each, LOCAL_RANK 0 on both, each node its own TMPDIR), sharing run.out_dir. SFT then GRPO (HF engine)
under ZeRO-3 end with one process's weights; a node killed mid-run (SIGKILL) or frozen (SIGSTOP, a hung host) makes
the other stop within run.dist_timeout_s instead of hanging."""

import subprocess
import sys
import time

import pytest
import yaml
from _launch import clean_env, free_port
from test_train_multirank import _assert_matches, _recipe, _train_one_process

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.timeout(900)]


def _launch_nodes(tmp_path, config, node_env=({}, {})):
    port, procs = free_port(), []
    for rank in range(2):
        node = tmp_path / f"node{rank}"
        node.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "vlmfast.train", "--config", str(config)]
        env = clean_env(TMPDIR=str(node), **node_env[rank])
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train_one_process(tmp_path_factory, 1)


def test_two_nodes_end_where_one_process_ends(single, tmp_path):
    procs = _launch_nodes(tmp_path, _recipe(tmp_path, "two", 3))
    outs = [p.communicate(timeout=800) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    _assert_matches(tmp_path, single)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_frozen_node_stops_the_other_within_the_timeout(tmp_path, how):
    """SIGKILL: node 1's connections close and node 0 fails at its next collective; SIGSTOP (a hung host, the
    connections stay open): only the process group's timeout (run.dist_timeout_s) ends node 0's wait."""
    import signal

    config = _recipe(tmp_path, "stopped", 3)
    raw = yaml.safe_load(config.read_text())
    raw["run"]["dist_timeout_s"] = 20
    config.write_text(yaml.safe_dump(raw))
    at = {"SIGKILL": {"VLMFAST_KILL_AT": "0:2"}, "SIGSTOP": {"VLMFAST_SIGNAL_AT": "0:2:SIGSTOP"}}[how]
    procs = _launch_nodes(tmp_path, config, ({}, at))  # node 1 stops before SFT step 3
    marker = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (marker.exists() and len(marker.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)  # steps 1 and 2 written: node 1 stops right after
    stopped = time.monotonic()
    out, err = procs[0].communicate(timeout=300)
    waited = time.monotonic() - stopped
    print(f"{how}: node 0 stopped {waited:.1f} s after node 1")
    for p in procs:  # node 1's launcher (and its stopped worker)
        p.send_signal(signal.SIGKILL) if p.poll() is None else None
    subprocess.run(["pkill", "-KILL", "-f", str(config)], check=False)
    assert procs[0].returncode != 0, err[-3000:]
    assert waited < 20 + 60, waited  # the timeout, plus the launcher's own shutdown
    if how == "SIGSTOP":
        assert waited >= 15, waited  # nothing but the timeout ended it
    assert not (tmp_path / "stopped" / "results.json").exists()
