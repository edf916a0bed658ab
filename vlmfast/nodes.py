"""What a run on several nodes needs before it starts: every rank sees rank 0's `run.out_dir` (a filesystem every
node mounts), and each node downloads the hub model and datasets once.

Both are collectives: every rank calls them, in the same order, right after the process group is up.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import torch

from .ranks import from_rank0, several_ranks

SEE_TIMEOUT_S = 10.0  # a network filesystem may show another client's new file a few seconds late


def check_shared_out_dir(out_dir: Path) -> None:
    """Rank 0 writes a nonce under `out_dir` and every rank reads it back. On a node whose `out_dir` is its own disk
    (not shared), checkpoints, metrics and the synthetic data would split across nodes and a resume would find
    half of them: every rank stops (ConfigError) naming the directory and the hosts that do not see rank 0's file."""
    from .config import ConfigError
    if not several_ranks():
        return
    rank, nonce = torch.distributed.get_rank(), from_rank0(uuid.uuid4().hex)
    path = Path(out_dir) / f".vlmfast-shared-{nonce}"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(nonce)
    torch.distributed.barrier()
    deadline = time.monotonic() + SEE_TIMEOUT_S
    while not (sees := path.exists() and path.read_text() == nonce) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, (socket.gethostname(), rank, sees))
    if rank == 0:
        path.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for host, r, ok in seen if not ok]
    if blind:
        raise ConfigError(f"run.out_dir={out_dir} is not one directory for every rank: {', '.join(blind)} cannot see "
                          f"the file rank 0 wrote there ({Path(out_dir).resolve()} on rank 0); put run.out_dir on a "
                          "filesystem every node mounts at the same path (an absolute path)")


def hub_models(cfg) -> list[str]:
    """Model names the run loads from the hub: the policy and OPD teachers that are neither tiny nor local paths."""
    names = [cfg.model.path] + [s.teacher for s in cfg.stages if s.teacher]
    out = []
    for name in names:
        if not name.startswith("tiny:") and not Path(name).exists() and name not in out:
            out.append(name)
    return out


def hub_datasets(cfg) -> list[str]:
    """Data sources (`name` or `name:split`) that are not files or folders here: hub datasets."""
    from .data.loading import data_sources, is_hub_source

    return [s for s in data_sources(cfg).values() if is_hub_source(s)]


def _download_model(name: str) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(name)  # the files only; with HF_HUB_OFFLINE=1 it checks the cache


def _download_dataset(source: str) -> None:
    import datasets

    name, _, split = source.partition(":")
    datasets.load_dataset(name, split=split or "train")


def fetch_once_per_node(cfg, *, download_model=_download_model, download_dataset=_download_dataset) -> list[str]:
    """Each node's LOCAL_RANK 0 downloads the hub models and datasets into the node's cache while the node's other
    ranks wait at a barrier; they then load from the cache. At once, every rank of every node fetched the same
    files and raced on the cache's locks. The wait is a collective: a download longer than run.dist_timeout_s
    fails it (download a large model before the job, or raise the key). Returns what this rank fetched."""
    fetched = []
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for name, fetch in [*((n, download_model) for n in hub_models(cfg)),
                            *((s, download_dataset) for s in hub_datasets(cfg))]:
            try:
                fetch(name)
            except Exception as e:  # a misspelled folder reads as a hub name: say both
                from .config import ConfigError

                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ConfigError(f"{name}: no such file or folder here, and not fetched from the hub as a name "
                                  f"({type(e).__name__}: {first[:300]})") from None
            fetched.append(name)
    if several_ranks():
        torch.distributed.barrier()
    return fetched
