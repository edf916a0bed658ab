"""Padding-free forwards: a padded batch's real tokens back to back in one row, so the trunk (embeddings, every
layer's QKV, attention, O and MLP, and ZeRO-3's traffic for them) computes real tokens only.

    batch   input_ids [B, T] (padded left or right), attention_mask [B, T], images in row order
    packed  input_ids [1, N], N = real tokens; position_ids [4, 1, N] for Qwen-VL (row 0: each sequence's text
            positions, restarting at 0, from which transformers builds the block-diagonal causal mask, flash-
            attention's varlen path on CUDA, an SDPA mask on the CPU; rows 1-3: the 3-D mRoPE positions, computed
            per sequence by the model's get_rope_index on the padded batch, so each sequence's images sit in its own
            span) or [1, N] for text models; no attention mask
    hidden  [1, N, H] -> [B, T, H] again (zeros at pads, which no loss counts): every loss, reference and teacher
            pass reads the batch layout it always did

transformers' convention (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: `position_ids.shape[0] == 4` is "packed"; text models
detect packing from positions that restart) is what verl's `use_remove_padding` and TRL's padding-free SFT rely
on. `use_packed_forward(model)` turns it on for a model; `trunk_hidden` (models.py) then packs every forward.
"""

from __future__ import annotations

import torch

PACKED_ATTR = "_vlmfast_packed"


def use_packed_forward(model, on: bool = True) -> None:
    """Every `trunk_hidden(model, ...)` runs padding-free (on) or on the padded batch (off)."""
    setattr(model, PACKED_ATTR, bool(on))


def packs(model) -> bool:
    return getattr(model, PACKED_ATTR, False)


def _has_mrope(model) -> bool:
    return hasattr(getattr(model, "model", None), "get_rope_index")


def pack(model, batch: dict) -> tuple[dict, torch.Tensor]:
    """The model inputs of `batch` packed into one row, and the mask [B, T] of the real tokens (row-major: the
    order of the packed row)."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else torch.ones_like(
        ids, dtype=torch.bool)
    text = (mask.long().cumsum(1) - 1).clamp(min=0)  # each sequence's positions, from 0 at its first real token
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "position_ids",
                                                       "mm_token_type_ids")}
    out["input_ids"] = ids[mask][None]
    if _has_mrope(model):
        mm = batch.get("mm_token_type_ids")
        if mm is not None and (batch.get("image_grid_thw") is not None or batch.get("video_grid_thw") is not None):
            rope, _ = model.model.get_rope_index(ids, mm, image_grid_thw=batch.get("image_grid_thw"),
                                                 video_grid_thw=batch.get("video_grid_thw"),
                                                 second_per_grid_ts=batch.get("second_per_grid_ts"),
                                                 attention_mask=mask.long())
            positions = torch.cat([text[None], rope.to(text.device, text.dtype)])  # [4, B, T]
        else:  # no image in the batch: the 3-D positions are the text positions
            positions = text[None].expand(4, -1, -1)
        out["position_ids"] = positions[:, mask][:, None]  # [4, 1, N]
        if mm is not None:
            out["mm_token_type_ids"] = mm[mask][None]
    else:
        out["position_ids"] = text[mask][None]  # [1, N]
    return out, mask


def unpack(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[1, N, H] hidden states back to the batch's [B, T, H] layout, zeros at the pads (differentiable)."""
    B, T = mask.shape
    return hidden.new_zeros(B, T, hidden.shape[-1]).masked_scatter(mask[..., None], hidden[0])


def padding_share(mask: torch.Tensor) -> float:
    """The share of a padded batch's token slots that are padding (what a packed forward does not compute)."""
    return 1.0 - mask.sum().item() / max(1, mask.numel())
