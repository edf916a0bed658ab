"""Atomic checkpoints of a training run: the DeepSpeed engine state (weights, optimizer, partitions
under ZeRO), the HF weights + processor (what the next stage and evaluation load), and the trainer
state (stage, step, RNG, early stopping). Written to a temp dir and renamed; `latest` is replaced
atomically, so a killed run resumes from its last complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .zero import gathered

LATEST = "latest"


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state() -> dict:
    """Every random generator a step may draw from: torch (CPU and every CUDA device), Python, numpy."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.random.get_rng_state().tolist(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def read_rank_state(path: Path) -> dict | None:
    """This rank's own part of a checkpoint (its RNG states, a rollout batch in progress), if saved."""
    f = Path(path) / f"rank{_rank()}.pt"
    return torch.load(f, weights_only=True) if f.exists() else None


def save_hf(model, processor, path: Path) -> None:
    """The full HF model (gathered under ZeRO-3) + processor, written by rank 0."""
    with gathered(list(model.parameters())):
        if _is_main():
            model.save_pretrained(path)
    if _is_main():
        processor.save_pretrained(path)


def save(ckpt_root: Path, tag: str, engine, model, processor, state: dict, *, with_engine: bool = True,
         with_hf: bool = True, rank_state: dict | None = None) -> Path:
    """Write checkpoint `tag` under ckpt_root atomically and point `latest` at it. A state-only
    checkpoint (with_engine=False, with_hf=False) marks a finished stage. Every rank also writes its
    own RNG states and `rank_state` (what only it holds: its share of a rollout batch)."""
    ckpt_root = Path(ckpt_root)
    final, tmp = ckpt_root / tag, ckpt_root / f".tmp-{tag}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if with_engine:
        engine.save_checkpoint(str(tmp), tag="engine")
    if with_hf:
        save_hf(model, processor, tmp / "hf")
    torch.save({"rng": rng_state(), **(rank_state or {})}, tmp / f"rank{_rank()}.pt")
    _barrier()  # every rank's file is in before the checkpoint is renamed into place
    if _is_main():
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_state()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = ckpt_root / f".{LATEST}.tmp"
        pointer.write_text(tag)
        os.replace(pointer, ckpt_root / LATEST)
    _barrier()
    return final


def latest(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / LATEST
    if not pointer.exists():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def prune(ckpt_root: Path, keep: set[str]) -> None:
    """Delete step checkpoints not in `keep` (stage-final and best checkpoints are kept by name)."""
    if not _is_main():
        return
    for p in Path(ckpt_root).glob("step-*"):
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
