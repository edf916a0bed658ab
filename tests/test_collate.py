"""Collation: labels cover exactly the response, images expand to their tokens, and max_length
never cuts through a prompt (image tokens included)."""

import io

import pytest
import torch
from PIL import Image

from vlmfast.data.collate import collate
from vlmfast.data.synthetic import generate
from vlmfast.models import build_processor, build_tokenizer


@pytest.fixture(scope="module")
def proc():
    from vlmfast.data.synthetic import corpus

    return build_processor(build_tokenizer(corpus()))


@pytest.fixture(scope="module")
def rows():
    rs = generate("train", 3, seed=2)
    return [r["problem"] for r in rs], [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rs]


RESPONSES = ["<think>three shapes</think> \\boxed{3}",
             "<think>a much longer chain of thought here</think> \\boxed{red}", "\\boxed{1}"]


def test_labels_are_the_shifted_response(proc, rows):
    problems, images = rows
    b = collate(proc, problems, images, RESPONSES)
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for i, resp in enumerate(RESPONSES):
        lab = b["labels"][i]
        assert tok.decode(lab[lab != -100]) == resp + "<|im_end|>"
        # shifted: labels[t] == input_ids[t + 1] wherever defined
        idx = (lab != -100).nonzero().squeeze(1)
        assert torch.equal(lab[idx], b["input_ids"][i, idx + 1])
        # 84x84 image -> 36 patches -> 9 merged tokens, all in the prompt
        assert (b["input_ids"][i] == image_id).sum() == 9 and (lab == image_id).sum() == 0
    assert b["pixel_values"].shape[0] == 3 * 36 and b["image_grid_thw"].tolist() == [[1, 6, 6]] * 3
    assert (b["attention_mask"][:, 0] == 1).all()  # right padded for training


def test_truncation_cuts_only_responses(proc, rows):
    problems, images = rows
    full = collate(proc, problems, images, RESPONSES)
    longest_prompt = int(full["prompt_lengths"].max())
    b = collate(proc, problems, images, RESPONSES, max_length=longest_prompt + 2)
    assert b["input_ids"].shape[1] == longest_prompt + 2
    assert b["truncated"].any() and (b["labels"] != -100).sum(1).min() >= 1
    with pytest.raises(ValueError, match=r"example 0: max_length=20 would cut its prompt of \d+ tokens"):
        collate(proc, problems, images, RESPONSES, max_length=20)


def test_generation_prompts_are_left_padded(proc, rows):
    problems, images = rows
    b = collate(proc, problems, images)
    assert "labels" not in b and (b["attention_mask"][:, -1] == 1).all()


def test_mismatched_batch_parts(proc, rows):
    problems, images = rows
    with pytest.raises(ValueError, match="batch parts differ in length"):
        collate(proc, problems, images[:2], RESPONSES)


def test_fast_prompt_lengths_equal_the_processor_count(proc, rows):
    """The text-only prompt lengths (+ image expansion) equal a processor pass over the prompts."""
    from vlmfast.data.collate import _prompt_texts

    problems, images = rows
    b = collate(proc, problems, images, RESPONSES)
    flat = [im for ims in images for im in ims]
    proc.tokenizer.padding_side = "right"
    slow = proc(text=_prompt_texts(proc, problems), images=flat, padding=True, return_tensors="pt")
    assert torch.equal(b["prompt_lengths"], slow["attention_mask"].sum(1))


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_image_features_equal_the_processor(proc, rows, side):
    """processor_inputs (image features computed once per image, each distinct text tokenised once) gives the
    processor's own tensors, also on a second call served from the cache, with two images in one example and
    with rows repeated as in a GRPO batch."""
    from vlmfast.data.collate import _prompt_texts, processor_inputs

    problems, images = rows
    problems = problems[:2] + ["<image>left<image>right: which has more shapes?"] + problems[1:2] * 3
    images = images[:2] + [[images[0][0], images[2][0]]] + images[1:2] * 3
    texts = _prompt_texts(proc, problems)
    flat = [im for ims in images for im in ims]
    proc.tokenizer.padding_side = side
    want = proc(text=texts, images=flat, padding=True, return_tensors="pt")
    for _ in range(2):
        got = processor_inputs(proc, texts, flat)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_image_cache_stays_within_its_budget(proc, rows):
    from vlmfast.data.collate import _ImageFeatureCache

    _, images = rows
    one = _ImageFeatureCache().get(proc.image_processor, images[0][0])[0]
    cache = _ImageFeatureCache(budget=2 * one.numel() * one.element_size())
    for ims in images:
        cache.get(proc.image_processor, ims[0])
    assert len(cache.entries) == 2 and cache.bytes <= cache.budget
    assert images[0][0] is not next(iter(cache.entries.values()))[0]()  # the least recently used went first


def test_the_image_cache_keeps_no_image_alive(proc):
    """A decoded image its owner drops is freed while its features stay cached (the cache holding originals would
    keep a lazily decoded split in memory); an image made later under the dead one's id is a miss, and the byte
    count stays that of the entries."""
    import gc
    import weakref

    from vlmfast.data.collate import _ImageFeatureCache

    cache = _ImageFeatureCache()
    img = Image.new("RGB", (56, 56), (10, 200, 10))
    cache.get(proc.image_processor, img)
    ref, key = weakref.ref(img), id(img)
    del img
    gc.collect()
    assert ref() is None and key in cache.entries
    other = Image.new("RGB", (84, 84), (200, 10, 10))
    pv, _ = cache.get(proc.image_processor, other)
    assert pv.shape[0] > 0 and (id(other) != key or cache.entries[key][0]() is other)
    assert cache.bytes == sum(e[1].numel() * e[1].element_size() for e in cache.entries.values())


def test_image_markers_must_match_the_images(proc, rows):
    from vlmfast.data.collate import processor_inputs

    _, images = rows
    with pytest.raises(ValueError, match="markers"):
        processor_inputs(proc, ["no image marker here"], [images[0][0]])


@pytest.fixture(scope="module")
def mixed(rows):
    """Rows holding 2, 0, 1, 3, 0 and 1 images of different sizes (a text-only problem beside several
    multi-image ones), as a dataset mixing them batches them."""
    _, images = rows
    a, b, c = (ims[0] for ims in images)
    small, wide = a.resize((56, 56)), b.resize((112, 56))
    problems = ["<image><image>which has more shapes?", "how many sides has a square?", "<image>what colour?",
                "<image><image><image>which differs?", "what is 3 + 4?", "<image>how many shapes?"]
    imgs = [[a, wide], [], [small], [c, a, small], [], [b]]
    responses = ["\\boxed{left}", "\\boxed{4}", "\\boxed{red}", "\\boxed{2}", "\\boxed{7}", "\\boxed{3}"]
    return problems, imgs, responses


def test_images_per_row_are_each_examples_images(proc, mixed):
    from vlmfast.data.collate import images_per_row

    problems, images, responses = mixed
    assert images_per_row(collate(proc, problems, images, responses)) == [len(ims) for ims in images]
    assert images_per_row(collate(proc, problems, images)) == [len(ims) for ims in images]  # generation prompts


@pytest.mark.parametrize("rows_of", ["slices", "index lists"])
def test_rows_of_a_batch_carry_their_own_images(proc, mixed, rows_of):
    """Any rows of a batch whose rows hold different numbers of images (micro-batches, a DPO pair's halves, the
    first prompt of each run of copies) have exactly the images and grids that collating those examples alone
    gives, and the batch's own token rows."""
    from vlmfast.data.collate import batch_rows

    problems, images, responses = mixed
    batch = collate(proc, problems, images, responses)
    n = len(problems)
    if rows_of == "slices":
        picks = [slice(i, j) for i in range(n) for j in range(i + 1, n + 1)]
    else:
        picks = [[1, 3], [0, 2, 5], [5, 0], [3], [1, 4]]
    for pick in picks:
        index = list(range(n))[pick] if isinstance(pick, slice) else pick
        part = batch_rows(batch, pick)
        alone = collate(proc, [problems[i] for i in index], [images[i] for i in index], [responses[i] for i in index])
        if "image_grid_thw" in alone:
            assert torch.equal(part["image_grid_thw"], alone["image_grid_thw"]), pick
            assert torch.equal(part["pixel_values"], alone["pixel_values"]), pick
        else:  # text-only rows: no image input at all, as collating them alone gives (an empty grid crashes the tower)
            assert "image_grid_thw" not in part and "pixel_values" not in part, pick
        for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
            assert torch.equal(part[k], batch[k][index]), (pick, k)


def test_a_batch_whose_images_miss_its_image_tokens_is_named(proc, mixed):
    from vlmfast.data.collate import images_per_row

    problems, images, responses = mixed
    batch = collate(proc, problems, images, responses)
    batch["image_grid_thw"] = batch["image_grid_thw"][1:]  # the first row's first image gone
    with pytest.raises(ValueError, match="row 0|do not match"):
        images_per_row(batch)
