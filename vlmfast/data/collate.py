"""Collation for VLM batches through the processor: chat template, image tokens, padding, labels.

`collate(processor, problems, images, responses)` gives input_ids, attention_mask, pixel_values,
image_grid_thw (and whatever else the processor returns) plus `labels` [B, T]: shifted targets,
-100 everywhere but the response (and its closing <|im_end|>), so `labels[b, t]` is the token
`hidden[b, t]` predicts — the convention of every vlmfast loss. With responses=None it builds
left-padded generation prompts instead.

A sequence longer than `max_length` is truncated only inside its response; if the cut would fall
in the prompt (and so possibly through its image tokens) the batch is rejected with an error naming
the example: never a silent cut through an image.
"""

from __future__ import annotations

import torch

from .prompts import messages

END_OF_TURN = "<|im_end|>"


def _prompt_texts(processor, problems):
    return [processor.apply_chat_template(messages(p), add_generation_prompt=True, tokenize=False) for p in problems]


def _images_arg(images):
    flat = [img for per_example in images for img in per_example]
    return flat or None


def _prompt_lengths(processor, prompts, full, images, batch) -> torch.Tensor:
    """Where each response starts in the processed batch (image tokens expanded).

    Text-only tokenisation of the prompts, plus each image's expansion from image_grid_thw; this
    holds when tokenising prompt + response splits at the prompt's end, which is checked: otherwise
    the prompts go through the processor (images included) once more.
    """
    tok = processor.tokenizer
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    splits_cleanly = all(f[: len(p)] == p for p, f in zip(p_ids, f_ids))
    if splits_cleanly and ("image_grid_thw" in batch or not _images_arg(images)):
        merge = getattr(processor.image_processor, "merge_size", 2)
        per_image = (batch["image_grid_thw"].prod(-1) // merge**2).tolist() if "image_grid_thw" in batch else []
        out, k = [], 0
        for p, ims in zip(p_ids, images):
            extra = sum(per_image[k + j] - 1 for j in range(len(ims)))
            k += len(ims)
            out.append(len(p) + extra)
        return torch.tensor(out)
    prompt_batch = processor(text=prompts, images=_images_arg(images), padding=True, return_tensors="pt")
    return prompt_batch["attention_mask"].sum(1)


def collate(processor, problems: list[str], images: list[list], responses: list[str] | None = None, *,
            max_length: int | None = None, ids: list[str] | None = None) -> dict:
    """Batch examples for training (responses given: right padding, labels) or generation
    (responses=None: left padding, prompt only). `images[i]` is the list of PIL images of example i."""
    if not (len(problems) == len(images) and (responses is None or len(responses) == len(problems))):
        raise ValueError(f"batch parts differ in length: {len(problems)} problems, {len(images)} image lists, "
                         f"{None if responses is None else len(responses)} responses")
    ids = ids or [str(i) for i in range(len(problems))]
    tok = processor.tokenizer
    prompts = _prompt_texts(processor, problems)
    if responses is None:
        tok.padding_side = "left"
        return dict(processor(text=prompts, images=_images_arg(images), padding=True, return_tensors="pt"))
    tok.padding_side = "right"
    full = [p + r + END_OF_TURN for p, r in zip(prompts, responses)]
    batch = dict(processor(text=full, images=_images_arg(images), padding=True, return_tensors="pt"))
    prompt_lengths = _prompt_lengths(processor, prompts, full, images, batch)
    input_ids, attn = batch["input_ids"], batch["attention_mask"]
    lengths = attn.sum(1)
    truncated = torch.zeros(len(full), dtype=torch.bool)
    if max_length is not None and input_ids.shape[1] > max_length:
        for i in range(len(full)):
            if lengths[i] > max_length and prompt_lengths[i] + 1 > max_length:
                raise ValueError(
                    f"example {ids[i]}: max_length={max_length} would cut its prompt of {int(prompt_lengths[i])} "
                    "tokens (image tokens included); raise max_length or shorten the problem"
                )
        truncated = lengths > max_length
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if k in batch:
                batch[k] = batch[k][:, :max_length]
        input_ids, attn = batch["input_ids"], batch["attention_mask"]
        lengths = attn.sum(1)
    # labels[t] = input_ids[t + 1] inside the response, -100 elsewhere
    T = input_ids.shape[1]
    pos = torch.arange(T)[None, :]
    nxt = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], 0)], 1)
    in_response = (pos + 1 >= prompt_lengths[:, None]) & (pos + 1 < lengths[:, None])
    batch["labels"] = torch.where(in_response, nxt, torch.full_like(nxt, -100))
    batch["truncated"] = truncated
    batch["prompt_lengths"] = prompt_lengths
    return batch


def collate_token_responses(processor, problems: list[str], images: list[list], response_ids: list[list[int]]):
    """Like `collate`, but responses are token ids (as sampled), appended to the prompts untouched:
    no re-tokenisation, so per-token log-probs line up with the sampler's."""
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i, resp in enumerate(response_ids):
        if image_id in resp:
            raise ValueError(f"response {i} contains the image token <|image_pad|> (id {image_id}): it would be read "
                             "as an image slot; suppress vision tokens when sampling")
    prompts = collate(processor, problems, images)  # left padded prompt batch
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    pad = processor.tokenizer.pad_token_id
    rows, prompt_lengths = [], []
    for b, resp in enumerate(response_ids):
        p = ids[b][mask[b].bool()]
        prompt_lengths.append(len(p))
        rows.append(torch.cat([p, torch.tensor(resp, dtype=ids.dtype)]))
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad, dtype=ids.dtype)
    attention_mask = torch.zeros((len(rows), T), dtype=mask.dtype)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = r
        attention_mask[b, : len(r)] = 1
        start = prompt_lengths[b]
        labels[b, start - 1 : len(r) - 1] = r[start:]
    out = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in prompts:
        mm = torch.zeros((len(rows), T), dtype=prompts["mm_token_type_ids"].dtype)
        for b in range(len(rows)):
            m = prompts["mm_token_type_ids"][b][mask[b].bool()]
            mm[b, : len(m)] = m
        out["mm_token_type_ids"] = mm
    out.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
               prompt_lengths=torch.tensor(prompt_lengths))
    return out
