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

import itertools
import weakref
from collections import OrderedDict

import torch

from .prompts import messages

END_OF_TURN = "<|im_end|>"
IMAGE_CACHE_BYTES = 1 << 30  # per processor; an 84x84 image's pixel_values are ~170 KB


class _ImageFeatureCache:
    """Image processor outputs per image object, least recently used dropped past a byte budget.

    Training revisits every image many times and the image processor (resize, normalise, patchify)
    costs as much as the tiny model's forward; its output depends on the image alone. Keyed by the
    image object through a weak reference: the cache never keeps a decoded image alive (a 12-megapixel photo
    is 36 MB, its features at the run's pixel limit a few hundred KB; a lazily decoded split must stay lazy), and
    an id reused after its image died is a miss.
    """

    def __init__(self, budget: int = IMAGE_CACHE_BYTES):
        self.entries: OrderedDict[int, tuple] = OrderedDict()
        self.bytes, self.budget = 0, budget

    def get(self, image_processor, img) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.entries.get(id(img))
        if hit is not None and hit[0]() is img:
            self.entries.move_to_end(id(img))
            return hit[1], hit[2]
        out = image_processor(images=[img], return_tensors="pt")
        pv, thw = out["pixel_values"], out["image_grid_thw"][0]
        try:
            ref = weakref.ref(img)
        except TypeError:  # an image type without weak references (a numpy array): held, as its id must not be reused
            ref = lambda img=img: img  # noqa: E731
        stale = self.entries.pop(id(img), None)  # a dead image's entry under a reused id
        if stale is not None:
            self.bytes -= stale[1].numel() * stale[1].element_size()
        self.entries[id(img)] = (ref, pv, thw)
        self.bytes += pv.numel() * pv.element_size()
        while self.bytes > self.budget and len(self.entries) > 1:
            _, (_, old, _) = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return pv, thw


_CACHES: weakref.WeakKeyDictionary[object, _ImageFeatureCache] = weakref.WeakKeyDictionary()


def processor_inputs(processor, texts: list[str], images: list | None) -> dict:
    """`processor(text=texts, images=images, padding=True)`, the same tensors, with each image's
    features computed once per processor (tested equal to the processor's own output).

    Processors without Qwen-VL style grids (no image_grid_thw / merge_size) take the plain call.
    """
    ip = getattr(processor, "image_processor", None)
    token = getattr(processor, "image_token", None)
    if not images or ip is None or token is None or not hasattr(ip, "merge_size"):
        return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    cache = _CACHES.setdefault(processor, _ImageFeatureCache())
    feats = [cache.get(ip, img) for img in images]
    counts = iter([int(thw.prod()) // ip.merge_size**2 for _, thw in feats])
    expanded = []
    for t in texts:  # each image marker -> as many image tokens as its merged patches, in order
        pieces = t.split(token)
        expanded.append(pieces[0] + "".join(token * next(counts) + rest for rest in pieces[1:]))
    if next(counts, None) is not None:
        raise ValueError(f"{len(images)} images but fewer {token} markers in the texts")
    # each distinct text tokenised once (a GRPO batch repeats every prompt group_size times); padding to the
    # longest distinct text is padding to the longest text
    distinct = list(dict.fromkeys(expanded))
    batch = dict(processor.tokenizer(distinct, padding=True, return_tensors="pt"))
    if len(distinct) < len(expanded):
        where = {t: i for i, t in enumerate(distinct)}
        rows = torch.tensor([where[t] for t in expanded])
        batch = {k: v[rows] for k, v in batch.items()}
    batch["mm_token_type_ids"] = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).long()
    batch["pixel_values"] = torch.cat([pv for pv, _ in feats])
    batch["image_grid_thw"] = torch.stack([thw for _, thw in feats])
    return batch


def images_per_row(batch: dict) -> list[int]:
    """How many images each row of a collated batch holds. `image_grid_thw` and `pixel_values` list the batch's
    images in row order, and a row may hold none (a text-only problem) or several: each image fills
    patches / merge² of its row's image tokens (mm_token_type_ids == 1), the merge read off the batch (all its
    patches over all its image tokens), so the rows are walked consuming images until each row's count is met."""
    patches = batch["image_grid_thw"].prod(-1).tolist()
    tokens = (batch["mm_token_type_ids"] == 1).sum(1).tolist()
    merge2 = sum(patches) // max(sum(tokens), 1)
    if merge2 < 1 or any(p % merge2 for p in patches):
        raise ValueError(f"a batch of {len(patches)} images ({sum(patches)} patches) and {sum(tokens)} image tokens: "
                         "its images and image tokens do not match")
    counts, k = [], 0
    for row, need in enumerate(tokens):
        start = k
        while need > 0 and k < len(patches):
            need -= patches[k] // merge2
            k += 1
        if need:
            raise ValueError(f"row {row}: its image tokens do not end at an image's last token")
        counts.append(k - start)
    if k != len(patches):
        raise ValueError(f"{len(patches) - k} images of the batch fall in no row's image tokens")
    return counts


def to_device(batch, device):
    """A batch's tensors (a dict's values, or one tensor) on `device`, where the model lives. Batches are collated and
    sliced on the host (lengths and image counts read there without a device sync); each micro-batch moves before its
    forward, the one place a host tensor meets the model."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_rows(batch: dict, rows: slice | list[int]) -> dict:
    """Rows `rows` (a slice, or row indices) of a collated batch as a batch of their own, each row's images with it
    (images_per_row: rows may hold different numbers of images). A contiguous run of images is a view, not a copy."""
    index = list(range(len(batch["input_ids"])))[rows] if isinstance(rows, slice) else list(rows)
    pick = rows if isinstance(rows, slice) else None
    out = {k: v[pick if pick is not None else torch.tensor(index, device=v.device)] for k, v in batch.items()
           if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" not in batch:
        return out
    first = [0, *itertools.accumulate(images_per_row(batch))]  # each row's first image, and one past the last's
    images = [i for r in index for i in range(first[r], first[r + 1])]
    if not images:  # text-only rows: no image inputs at all (the vision tower refuses an empty grid)
        return out
    grid = batch["image_grid_thw"]
    patch = [0, *itertools.accumulate(grid.prod(-1).tolist())]  # each image's first patch in pixel_values
    lo = images[0]
    if images == list(range(lo, lo + len(images))):
        out["image_grid_thw"] = grid[lo : lo + len(images)]
        out["pixel_values"] = batch["pixel_values"][patch[lo] : patch[lo + len(images)]]
    else:
        out["image_grid_thw"] = grid[torch.tensor(images, device=grid.device)]
        out["pixel_values"] = torch.cat([batch["pixel_values"][patch[i] : patch[i + 1]] for i in images])
    return out


def _prompt_texts(processor, problems):
    """The chat-templated prompt of each problem, each distinct problem templated once (a GRPO batch repeats
    every prompt group_size times)."""
    texts = {}
    for p in problems:
        if p not in texts:
            texts[p] = processor.apply_chat_template(messages(p), add_generation_prompt=True, tokenize=False)
    return [texts[p] for p in problems]


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
    prompt_batch = processor_inputs(processor, prompts, _images_arg(images))
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
        return processor_inputs(processor, prompts, _images_arg(images))
    tok.padding_side = "right"
    full = [p + r + END_OF_TURN for p, r in zip(prompts, responses)]
    batch = processor_inputs(processor, full, _images_arg(images))
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
