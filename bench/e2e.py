"""End to end: one SFT step and one GRPO update step of the tiny Qwen2.5-VL student on the synthetic
task, with vlmfast's fused losses vs the same step written with naive losses (the lm_head applied,
full logits, log_softmax + gather). Tokens per second and peak memory, side by side.

The GRPO step here is the policy update on a fixed batch of sampled completions (sampling is the
engine's cost, the same for both)."""

from __future__ import annotations

import os
import time


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from ._runner import peak_rss_mb

    return peak_rss_mb()


def _loss_fn(stage: str, provider: str, model, b: dict, old_logp, adv):
    """The step's loss: vlmfast's fused loss through the lm_head's forward, or full logits."""
    import torch
    import torch.nn.functional as F

    from vlmfast.losses import grpo_loss, sft_loss
    from vlmfast.models import call_head, trunk_hidden

    labels = b["labels"]
    mask = labels != -100

    def loss_fn():
        hidden = trunk_hidden(model, **b)
        if provider.startswith("vlmfast"):
            if stage == "sft":
                return call_head(model, hidden, lambda h, w: sft_loss(h, w, labels))[0]
            return call_head(model, hidden, lambda h, w: grpo_loss(h, w, labels, old_logp, adv))[0]
        logits = model.lm_head(hidden).float()  # [B, T, V]
        if stage == "sft":
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        ratio = torch.exp((lp - old_logp) * mask)
        pg = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2))
        return (pg * mask).sum() / mask.sum()

    return loss_fn


def e2e_rows(device: str = "cpu", threads: int = 2, steps: int = 6, batch: int = 16) -> list[dict]:
    import tempfile

    import torch

    from vlmfast.data.formats import read_geometry3k
    from vlmfast.data.synthetic import build_task
    from vlmfast.ops import native
    from vlmfast.ops.native import keep_native_switch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        exs = read_geometry3k(build_task(tmp, sizes={"train": batch * 2, "val": 1, "ood": 1}, image_size=56,
                                         max_shapes=3, size_range=(0.15, 0.3))["train"])
    rows = []
    with keep_native_switch():
        for stage in ("sft", "grpo"):
            rows += _stage_rows(stage, device, exs, batch, steps, native.available())
    return rows


def _stage_rows(stage, device, exs, batch, steps, have_native) -> list[dict]:
    """One stage's step timed with each provider's losses (a fresh tiny model each)."""
    import torch

    from vlmfast.data.collate import collate
    from vlmfast.models import tiny_vlm

    from ._runner import reset_peak_rss

    rows = []
    # on a GPU vlmfast's losses run the triton backend; on a CPU the chunked one (PyTorch or native epilogue)
    for provider in ("naive", "vlmfast-triton") if device == "cuda" else ("naive", "vlmfast-chunked", "vlmfast-native"):
        if provider == "vlmfast-native" and not have_native:
            continue
        # the chunked backend's PyTorch epilogue (on a CPU), or its C++ one
        os.environ["VLMFAST_NATIVE"] = "1" if provider == "vlmfast-native" else "0"
        model, proc = tiny_vlm("student", seed=0)
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        part = exs[:batch]
        b = collate(proc, [e.problem for e in part], [e.images for e in part],
                    [f"<think>{e.meta.get('reasoning', '')}</think> \\boxed{{{e.answer}}}" for e in part])
        b = {k: v.to(device) for k, v in b.items()}
        labels = b["labels"]
        g = torch.Generator().manual_seed(0)
        old_logp = (-torch.rand(labels.shape, generator=g) * 3).to(device)
        adv = torch.randn(labels.shape[0], generator=g).to(device)

        loss_fn = _loss_fn(stage, provider, model, b, old_logp, adv)
        loss_fn().backward()  # warm-up
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        t = time.perf_counter()
        for _ in range(steps):
            loss_fn().backward()
            opt.step()
            opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        tokens = int(b["attention_mask"].sum())
        rows.append({"stage": stage, "provider": provider, "time_s": dt, "tokens_per_s": tokens / dt,
                     "peak_mb": _peak_mb(device), "tokens": tokens, "vocab": model.lm_head.weight.shape[0],
                     "device": device})
    return rows
