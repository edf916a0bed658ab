"""A run's data and processor as the trainer loads them, shared by `vlmfast train`, `vlmfast plan` and the study:
the synthetic task's files (generated once per task definition), every split's examples, the policy's processor
with the run's image pixel limits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ..config import Config
from ..ranks import is_main as _is_main


def synthetic_paths(cfg: Config) -> dict[str, Path]:
    """{train, val, ood} parquet files of the configured synthetic task, generated on first use
    (one folder per task definition, shared by every run under run.out_dir)."""
    from .synthetic import build_task

    s = cfg.data.synthetic
    key = hashlib.sha1(json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.run.out_dir) / ".data" / f"synthetic-{key}"
    if _is_main() and not all((root / f"{k}.parquet").exists() for k in ("train", "val", "ood")):
        build_task(root, sizes={"train": s.train, "val": s.val, "ood": s.ood}, seed=s.seed, image_size=s.image_size,
                   question_types=s.question_types, max_shapes=s.max_shapes, size_range=s.size_range)
    if torch.distributed.is_initialized():
        # every rank, always: a rank that saw the files rank 0 had just written and skipped the barrier
        # left rank 0 waiting in it forever (a CI hang)
        torch.distributed.barrier()
    return {k: root / f"{k}.parquet" for k in ("train", "val", "ood")}


def data_sources(cfg: Config) -> dict[str, str]:
    """{split: source} the recipe gives (data.train, data.val, data.eval_splits): a file or folder, or a hub dataset
    `name[:split]`."""
    d = cfg.data
    return {k: p for k, p in {"train": d.train, "val": d.val, **d.eval_splits}.items() if p}


def is_hub_source(source: str) -> bool:
    """A source that is no file or folder here: a hub dataset (`name` or `name:split`)."""
    return not Path(str(source).partition(":")[0]).exists()


def load_data(cfg: Config) -> dict:
    """{"train": [...], "val": [...], <extra eval split>: [...]} of Examples."""
    from .formats import RowError, read_geometry3k, read_mathvista

    d = cfg.data
    by_format = {"geometry3k": read_geometry3k, "mathvista": read_mathvista}
    paths, readers = {}, {}
    if d.synthetic is not None:
        paths = synthetic_paths(cfg)
        readers = dict.fromkeys(paths, read_geometry3k)  # the synthetic task is in Geometry3K format
    for k, p in data_sources(cfg).items():  # each split in its own format (train on one dataset, evaluate on another)
        paths[k], readers[k] = Path(p), by_format[d.split_formats.get(k, d.format)]
    data = {k: readers[k](p, text_only=d.text_only_rows) for k, p in paths.items()}
    for k, rows in data.items():
        if not rows:
            raise RowError(f"data split {k!r} ({paths[k]}) holds no rows")
    return data


def load_processor(cfg: Config, local_files_only: bool = False):
    """The policy's processor alone (tiny models: built with their model), with the run's image pixel limits."""
    path = cfg.model.path
    if path.startswith("tiny:"):
        from ..models import tiny_vlm

        processor = tiny_vlm(path[5:], seed=cfg.run.seed)[1]
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
    image_pixels(cfg, processor)
    return processor


def image_pixels(cfg: Config, processor) -> None:
    """vllm.image_min_pixels / image_max_pixels on the trainer's processor too: both see the same image tokens. Set
    in the image processor's `size` (shortest_edge / longest_edge: pixels, for Qwen2-VL's processors): its
    `min_pixels` / `max_pixels` attributes are passed to every call, deprecated in transformers 5 (a FutureWarning
    per call, and ignored once removed)."""
    image = getattr(processor, "image_processor", None)
    limits = {"shortest_edge": cfg.vllm.image_min_pixels, "longest_edge": cfg.vllm.image_max_pixels}
    limits = {k: v for k, v in limits.items() if v}
    if image is None or not limits:
        return
    size = image.size
    image.size = dataclasses.replace(size, **limits) if dataclasses.is_dataclass(size) else {**size, **limits}
