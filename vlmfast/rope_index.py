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
    dev = input_ids.device
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    # each row's kept tokens first, in order (a stable sort moves the padding behind them)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    ids, types = input_ids.gather(1, order), mm_token_type_ids.gather(1, order)
    n = keep.sum(1)
    j = torch.arange(T, device=dev).expand(B, T)
    vision = (types != 0) & (j < n[:, None])
    # images start where a vision run starts; they are consumed in row order, as the model's walk does
    starts = vision & ~torch.nn.functional.pad(vision[:, :-1], (1, 0), value=False)
    first_image = torch.cumsum(starts.sum(1), 0) - starts.sum(1)
    last_vision = torch.where(vision, j, -1).max(1).values
    cut = torch.where(last_vision >= 0, torch.minimum(n, last_vision + 2), 0)  # through the next text token
    compact = torch.zeros(3, B, T, dtype=input_ids.dtype, device=dev)
    nxt = torch.zeros(B, dtype=input_ids.dtype, device=dev)  # position of a row's first token after its prefix
    groups: dict[tuple, list[int]] = {}
    ids_list, cut_list = ids.tolist(), cut.tolist()
    starts_list, first_list = starts.sum(1).tolist(), first_image.tolist()
    for b in range(B):
        if cut_list[b]:
            grids = image_grid_thw[first_list[b] : first_list[b] + starts_list[b]]
            groups.setdefault((tuple(ids_list[b][: cut_list[b]]), tuple(grids.flatten().tolist())), []).append(b)
    for rows in groups.values():
        b, c = rows[0], cut_list[rows[0]]
        grids = image_grid_thw[first_list[b] : first_list[b] + starts_list[b]]
        head, _ = own_rope_index(ids[b : b + 1, :c], types[b : b + 1, :c], image_grid_thw=grids)
        rows_t = torch.tensor(rows, device=dev)
        compact[:, rows_t, :c] = head[:, :1].to(compact.dtype)
        nxt[rows_t] = head[0, 0, -1].to(nxt.dtype) + 1
    # after the prefix every token is text: one position more per token
    tail = nxt[:, None] + (j - cut[:, None])
    compact = torch.where((j >= cut[:, None]) & (j < n[:, None]), tail.expand(3, B, T), compact)
    compact = torch.where(j < n[:, None], compact, 0)
    position_ids = torch.zeros_like(compact).scatter_(2, order.expand(3, B, T), compact)
    deltas = compact.amax((0, 2)) + 1 - n
    return position_ids, deltas.view(B, 1)


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
