"""Atomic checkpoints of a training run, each holding only what is read from it:

- step checkpoints (`step-<stage>-<step>`, the last run.checkpoint_keep kept): the DeepSpeed engine state (weights,
  optimizer, ZeRO partitions) and the trainer state (stage, step, every rank's RNG and rollout in progress, the
  world size): what a resume reads; no HF export (a 7B export is 15 GB nothing reads back);
- hand-off checkpoints (`best-<stage>`, `final-<stage>`): the HF weights and processor the next stage and users load
  (gathered one module at a time under ZeRO-3), without optimizer states (the next stage starts its own);
- `done-<stage>`: the trainer state alone, marking a finished stage.

Each is written to a temp dir and renamed; `latest` names the newest resumable one (a step or done checkpoint),
replaced atomically, read by rank 0 and broadcast, so a killed run resumes from its last complete checkpoint on
every rank alike. Pruned checkpoints are renamed out of sight at once and deleted in the background."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import torch

from .lora import dense, float_dtype, has_lora, is_quantized, merged_state_dict, save_adapters
from .ranks import from_rank0
from .ranks import is_main as _is_main
from .zero import gathered, is_partitioned

LATEST = "latest"
ADAPTER_DIR = "adapter"  # a LoRA hand-off's adapters (PEFT format), inside its hf/ folder


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


def seed_rngs(seed: int) -> None:
    """Every random generator a stage may draw from (set_rng_state's), seeded: a stage draws its LoRA adapters' start
    and dropout masks alike in every run and on every rank, whatever ran before it in the process."""
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


def export_state_dict(model) -> dict | None:
    """The model's whole state dict in host memory on rank 0 (None on the others). Under ZeRO-3 each module's own
    parameters are gathered in turn (a collective: every rank calls it), so a GPU holds one module whole beyond its
    shard, never the model: DeepSpeed's 16-bit save walks the modules the same way
    (engine._zero3_consolidated_16bit_state_dict); its host copies would share the gathered storage on a CPU run,
    these are copies. A parameter shared by two modules is one tensor under both names."""
    main = _is_main()
    out, first_name, dtype = ({} if main else None), {}, float_dtype(model)  # dtype: a 4-bit weight's, dequantized
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        with gathered([p for _, p in own]):
            if not main:
                continue
            for name, p in own:
                key = f"{prefix}.{name}" if prefix else name
                out[key] = out[first_name[id(p)]] if id(p) in first_name else dense(p, dtype).to("cpu", copy=True)
                first_name.setdefault(id(p), key)
            for name, b in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    out[f"{prefix}.{name}" if prefix else name] = b.detach().to("cpu", copy=True)
    return out


def save_hf(model, processor, path: Path, base: str | None = None) -> None:
    """The HF model + processor, written by rank 0 (under ZeRO-3 gathered a module at a time: export_state_dict).
    A LoRA model is saved merged (a plain HF model), its adapters beside it in PEFT's format (`path`/adapter, for
    the base model `base`)."""
    lora = has_lora(model)
    state_dict = export_state_dict(model) if is_partitioned(model) or lora else None
    if _is_main():
        if lora:
            save_adapters(model, state_dict, path / ADAPTER_DIR, base)
            state_dict = merged_state_dict(model, state_dict)
        if is_quantized(model):  # QLoRA: the merged weights are dense, the folder a plain (unquantized) HF model
            _save_dense(model, state_dict, path)
        else:
            model.save_pretrained(path, state_dict=state_dict)
        processor.save_pretrained(path)


def _save_dense(model, state_dict: dict, path: Path) -> None:
    """A model loaded in 4 bits saved as the dense model its state dict holds: its config without the quantization,
    the weights in safetensors shards (transformers' save_pretrained would describe them as quantized)."""
    import copy

    from huggingface_hub import save_torch_state_dict

    config = copy.deepcopy(model.config)
    for cfg in (config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    save_torch_state_dict({k: v.contiguous() for k, v in state_dict.items()}, path, max_shard_size="5GB")


def save(ckpt_root: Path, tag: str, engine, model, processor, state: dict, *, with_engine: bool = True,
         with_hf: bool = False, resumable: bool = True, rank_state: dict | None = None) -> Path:
    """Write checkpoint `tag` under ckpt_root atomically; `latest` points at it when it is `resumable` (a step
    checkpoint with its engine state, or a state-only one marking a finished stage). Every rank also writes its
    own RNG states and `rank_state` (what only it holds: its share of a rollout batch)."""
    ckpt_root = Path(ckpt_root)
    final, tmp = ckpt_root / tag, ckpt_root / f".tmp-{tag}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if with_engine:  # a LoRA run's: the adapters and their optimizer states (the frozen base is its start's)
        engine.save_checkpoint(str(tmp), tag="engine", exclude_frozen_parameters=has_lora(model))
    if with_hf:
        save_hf(model, processor, tmp / "hf", base=state.get("lora_base"))
    torch.save({"rng": rng_state(), **(rank_state or {})}, tmp / f"rank{_rank()}.pt")
    _barrier()  # every rank's file is in before the checkpoint is renamed into place
    sync_tree(tmp)  # on disk before `latest` names it (each node's ranks flush what their node wrote)
    _barrier()
    if _is_main():
        write_atomic(tmp / "state.json", json.dumps({**state, "rng": rng_state()}))
        if final.exists():  # a best- checkpoint saved again: the old one renamed away, deleted after the new is in
            # place (deleting it first would leave no best- for as long as the deletion of ~100 GB takes)
            _delete_in_background(final)
        tmp.rename(final)
        _fsync_dir(ckpt_root)
        if resumable:
            write_atomic(ckpt_root / LATEST, tag)
    _barrier()
    return final


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text`, or what it held before: never a half-written file (a kill while it is written, or a
    machine that goes down after: the file is on disk before it is renamed, the rename before this returns)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sync_tree(root: Path) -> None:
    """Every file under `root` on disk (fsync), and the folders that name them: a rename only makes a checkpoint
    atomic against a killed process; after a power loss or a kernel panic its files could still be empty. As torch's
    distributed checkpoint writer does by default (FileSystemWriter, sync_files=True)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest(ckpt_root: Path) -> Path | None:
    """The checkpoint a resume continues from, as rank 0 reads it, on every rank (each reading `latest` on its own
    could see another file: a node's stale view of a shared filesystem, a checkpoint being written)."""
    path = None
    if _is_main():
        pointer = Path(ckpt_root) / LATEST
        if pointer.exists():
            found = Path(ckpt_root) / pointer.read_text().strip()
            path = str(found) if (found / "state.json").exists() else None
    path = from_rank0(path)
    return None if path is None else Path(path)


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


_deleting: list[threading.Thread] = []


def step_of(path: Path) -> tuple[int, int]:
    """(stage, step) of a `step-<stage>-<step>` checkpoint."""
    _, stage, step = path.name.split("-")
    return int(stage), int(step)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step checkpoints (hand-off checkpoints are kept by name). Rank 0 renames the others
    out of sight (`.trash-*`, atomic) and deletes them on a background thread: a 7B checkpoint is ~100 GB, and the
    other ranks would wait for the deletion at the next barrier."""
    if not _is_main():
        return
    steps = sorted(Path(ckpt_root).glob("step-*-*"), key=step_of)
    for p in steps[: max(0, len(steps) - keep_last)]:
        _delete_in_background(p)


def _delete_in_background(path: Path) -> None:
    """`path` renamed out of sight (`.trash-*`, atomic) at once, and deleted on a background thread."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    t = threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True)
    t.start()
    _deleting.append(t)


def finish_deletions() -> None:
    """Wait for the background deletions (at the end of a run: a finished run leaves no trash)."""
    while _deleting:
        _deleting.pop().join()
