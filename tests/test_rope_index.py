"""The prefix-shared 3D rope index equals transformers' own `get_rope_index` (positions and deltas) on every
batch shape the trainer builds, walks each distinct image prefix once, and leaves the model's outputs and
generations unchanged."""

import io

import pytest
import torch
from PIL import Image

from vlmfast.data.collate import collate, collate_token_responses
from vlmfast.data.synthetic import generate
from vlmfast.models import tiny_vlm
from vlmfast.rope_index import prefix_rope_index


@pytest.fixture(scope="module")
def model_proc():
    model, proc = tiny_vlm("student", seed=0)
    return model, proc


@pytest.fixture(scope="module")
def rows():
    rs = generate("train", 3, seed=5)
    return [r["problem"] for r in rs], [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rs]


def _own(model):
    return type(model.model).get_rope_index.__get__(model.model)


def _assert_same(model, batch):
    own = _own(model)
    args = dict(image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch.get("attention_mask"))
    want_pos, want_delta = own(batch["input_ids"], batch["mm_token_type_ids"], **args)
    got_pos, got_delta = prefix_rope_index(own, batch["input_ids"], batch["mm_token_type_ids"], **args)
    assert got_pos.shape == want_pos.shape and torch.equal(got_pos, want_pos)
    assert torch.equal(got_delta, want_delta)


def test_grpo_prompt_and_training_batches(model_proc, rows):
    model, proc = model_proc
    problems, images = rows
    rep_p = [p for p in problems for _ in range(4)]
    rep_i = [im for im in images for _ in range(4)]
    _assert_same(model, collate(proc, rep_p, rep_i))  # generation: left padded, rows repeat
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(10, 200, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
                 for _ in rep_p]
    _assert_same(model, collate_token_responses(proc, rep_p, rep_i, responses))  # training: right padded
    _assert_same(model, collate(proc, problems, images, ["\\boxed{1}", "a longer answer \\boxed{2}", "x"]))


def test_rows_with_two_images_none_and_ending_on_an_image(model_proc):
    """Hand-built rows: images of different grids consumed in row order, a text-only row between image rows,
    a row whose last token is an image token, left and right padding."""
    model, _ = model_proc
    img = model.config.image_token_id
    nine, eight = [img] * 9, [img] * 8  # grids [1, 6, 6] and [1, 4, 8] merge 2x2 into 9 and 8 tokens
    seqs = [[50, 60] + nine + [70, 80, 90] + eight + [100, 110],  # two images
            [50, 60, 70, 80, 90, 100],  # text only
            [50] + eight,  # ends on its image
            [50, 60] + nine + [70]]  # one text token after the image
    grids = torch.tensor([[1, 6, 6], [1, 4, 8], [1, 4, 8], [1, 6, 6]])
    T = max(map(len, seqs)) + 3
    for side in ("left", "right"):
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[b, sl], mask[b, sl] = torch.tensor(s), 1
        _assert_same(model, {"input_ids": ids, "attention_mask": mask, "image_grid_thw": grids,
                             "mm_token_type_ids": (ids == img).long() * mask})


def test_each_distinct_prefix_walked_once(model_proc, rows):
    model, proc = model_proc
    problems, images = rows
    calls = []
    own = _own(model)

    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return own(*a, **k)

    b = collate(proc, [p for p in problems for _ in range(8)], [im for im in images for _ in range(8)])
    prefix_rope_index(counting, b["input_ids"], b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"],
                      attention_mask=b["attention_mask"])
    # 24 rows of 3 prompts, all with the same text before their image: one prefix, one walk of one row
    assert calls == [1]


def test_installed_model_forward_and_generate_unchanged(rows):
    problems, images = rows
    plain, proc = tiny_vlm("student", seed=0)
    fast, _ = tiny_vlm("student", seed=0, processor=proc)
    assert "get_rope_index" in vars(fast.model)  # vlmfast's loaders install it
    vars(plain.model).pop("get_rope_index")  # transformers' own walk
    batch = collate(proc, [p for p in problems for _ in range(2)], [im for im in images for _ in range(2)],
                    ["\\boxed{1}", "no", "\\boxed{22}", "yes yes", "a", "b c d"])
    model_in = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                      "mm_token_type_ids")}
    with torch.no_grad():
        torch.testing.assert_close(fast(**model_in).logits, plain(**model_in).logits, rtol=0, atol=0)
    prompt = collate(proc, problems, images)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    assert torch.equal(fast.generate(**prompt, **kw), plain.generate(**prompt, **kw))
