"""Qwen2/2.5-VL's 3D rope positions computed once per distinct image prefix instead of once per row.

transformers' `get_rope_index` walks every row of a batch in Python (group the token types, one arange or
meshgrid per group): ~15 ms for a GRPO batch of 64 rows, at every training forward and every generation's
prefill. But the rows of a GRPO group share their prompt, and after a row's last image every position is
text: it continues the position of the first text token after that image one by one. So each distinct
prefix (the row up to that first text token, with its images' grids) goes through the model's own
`get_rope_index` once, and every row copies its prefix's positions and counts on from there.

`use_prefix_rope_index(model)` installs it on a model whose inner model has `get_rope_index` (Qwen2-VL,
Qwen2.5-VL); batches with videos take the model's own walk unchanged.
"""

from __future__ import annotations

import torch


def prefix_rope_index(own_rope_index, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                      image_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      video_grid_thw: torch.Tensor | None = None, second_per_grid_ts=None, **unused):
    """Same (position_ids [3, B, T], deltas [B, 1]) as `own_rope_index(...)` (the model's bound method; like it,
    ignores the other model kwargs generation passes)."""
    if video_grid_thw is not None or second_per_grid_ts is not None:  # videos: the model's own walk
        return own_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                              attention_mask=attention_mask, video_grid_thw=video_grid_thw,
                              second_per_grid_ts=second_per_grid_ts)
    B, T = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_vision = (mm_token_type_ids != 0) & keep
    # images start where a vision run starts; they are consumed in row order, as the model's walk does
    starts = is_vision & ~torch.nn.functional.pad(is_vision[:, :-1], (1, 0), value=False)
    images_per_row = starts.sum(1).tolist()
    position_ids = torch.zeros(3, B, T, dtype=input_ids.dtype, device=input_ids.device)
    deltas, prefixes, first_image = [], {}, 0
    for b in range(B):
        ids, types = input_ids[b][keep[b]], mm_token_type_ids[b][keep[b]]
        n = len(ids)
        grids = image_grid_thw[first_image : first_image + images_per_row[b]] if images_per_row[b] else None
        first_image += images_per_row[b]
        vision_at = types.nonzero()
        cut = min(n, int(vision_at[-1]) + 2) if len(vision_at) else 0  # through the first text token after
        if cut:
            key = (ids[:cut].cpu().numpy().tobytes(), grids.cpu().numpy().tobytes())
            if key not in prefixes:
                pos, _ = own_rope_index(ids[None, :cut], types[None, :cut], image_grid_thw=grids)
                prefixes[key] = pos[:, 0]
            head = prefixes[key]
            nxt = head[0, -1] + 1
            tail = (nxt + torch.arange(n - cut, device=ids.device)).expand(3, -1)
            row = torch.cat([head, tail], 1)
        else:
            row = torch.arange(n, device=ids.device).expand(3, -1)
        position_ids[:, b, keep[b]] = row.to(position_ids.dtype)
        deltas.append(row.max() + 1 - n if n else row.new_zeros(()))
    return position_ids, torch.stack(deltas).view(B, 1).to(input_ids.device)


def use_prefix_rope_index(model) -> bool:
    """Give `model.model` the prefix-shared `get_rope_index` (an instance attribute wrapping its own
    method); returns whether the model has one to replace."""
    inner = getattr(model, "model", None)
    own = getattr(type(inner), "get_rope_index", None) if inner is not None else None
    if own is None or "get_rope_index" in vars(inner):
        return own is not None
    bound = own.__get__(inner)

    def get_rope_index(input_ids, mm_token_type_ids=None, *args, **kwargs):
        if mm_token_type_ids is None or args:  # not the call shape transformers uses: the model's own
            return bound(input_ids, mm_token_type_ids, *args, **kwargs)
        return prefix_rope_index(bound, input_ids, mm_token_type_ids, **kwargs)

    inner.get_rope_index = get_rope_index
    return True
