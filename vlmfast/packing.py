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

Attention: flash-attention reads the sequences from the positions (its varlen kernel: work per sequence). SDPA
would be given a dense [N, N] block-diagonal mask, whose work grows with N^2 over the whole packed row (64
sequences of 80 tokens: 60x the attention of the padded batch, measured slower than padding on the CPU); so a packed
model's text attention is `vlmfast_varlen_sdpa` instead: SDPA on each sequence's span, causal, no mask (the same
work as flash-attention's varlen). Any call with a mask (padded batches, generation) goes to SDPA as before.
"""

from __future__ import annotations

import torch

PACKED_ATTR = "_vlmfast_packed"
VARLEN_SDPA = "vlmfast_varlen_sdpa"


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each sequence of a packed row: where its positions restart."""
    starts = [0, *((torch.diff(position_ids) != 1).nonzero()[:, 0] + 1).tolist()]
    return list(zip(starts, [*starts[1:], position_ids.shape[0]]))


def varlen_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: [1, heads, N, d] of a packed row -> SDPA on each sequence's span
    (causal, no mask); anything else (a mask, a cache, several rows) is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1
            or query.shape[2] != key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key head serves `groups` query heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling, is_causal=True)
        for a, b in _segments(position_ids[0])], dim=2)
    return out.transpose(1, 2).contiguous(), None  # [1, N, heads, d], as transformers' SDPA returns it


def _no_mask_when_packed(*args, attention_mask=None, **kwargs):
    """The mask function of VARLEN_SDPA: none for a batch without padding (a packed row's spans come from its
    positions), SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register_varlen_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _no_mask_when_packed)


def use_packed_forward(model, on: bool = True) -> None:
    """Every `trunk_hidden(model, ...)` runs padding-free (on) or on the padded batch (off). A text model on SDPA
    attends per sequence (VARLEN_SDPA) while packed; flash-attention keeps its own varlen path."""
    setattr(model, PACKED_ATTR, bool(on))
    text = getattr(model.config, "text_config", model.config)
    if on and text._attn_implementation == "sdpa":
        _register_varlen_sdpa()
        text._attn_implementation = VARLEN_SDPA
    elif not on and text._attn_implementation == VARLEN_SDPA:
        text._attn_implementation = "sdpa"


def packs(model) -> bool:
    return getattr(model, PACKED_ATTR, False)


def _has_mrope(model) -> bool:
    return hasattr(getattr(model, "model", None), "get_rope_index")


def pack(model, batch: dict) -> tuple[dict, torch.Tensor]:
    """The model inputs of `batch` packed into one row, and the mask [B, T] of the real tokens (row-major: the
    order of the packed row)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
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
