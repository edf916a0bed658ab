"""The tiny Qwen2.5-VL factory, the real loading path, the trunk/head split and freezing."""

import copy
import io

import pytest
import torch
from PIL import Image

from vlmfast import token_stats
from vlmfast.data.collate import collate
from vlmfast.data.synthetic import generate
from vlmfast.models import (
    NOT_MODEL_INPUTS,
    call_head,
    freeze,
    load_model,
    save_pretrained,
    tiny_vlm,
    trunk_hidden,
)


@pytest.fixture(scope="module")
def student():
    return tiny_vlm("student", seed=0)


@pytest.fixture(scope="module")
def batch(student):
    _, proc = student
    rows = generate("train", 3, seed=0)
    imgs = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    return collate(proc, [r["problem"] for r in rows], imgs,
                   ["<think>three</think> \\boxed{3}", "<think>red</think> \\boxed{red}", "\\boxed{1}"])


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def test_forward_with_image_uses_the_image(student, batch):
    model, _ = student
    out = model(**model_inputs(batch)).logits
    assert out.shape[:2] == batch["input_ids"].shape and torch.isfinite(out).all()
    other = dict(model_inputs(batch), pixel_values=torch.randn_like(batch["pixel_values"]))
    assert (model(**other).logits - out).abs().max() > 1e-4  # the image reaches the logits


def test_trunk_head_split_equals_model_logits_through_fused_op(student, batch):
    model, _ = student
    logits = model(**model_inputs(batch)).logits.float()
    hidden = trunk_hidden(model, **batch)
    labels = batch["labels"]
    want = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    for backend in ("reference", "chunked"):
        got = token_stats(hidden, model.lm_head.weight, labels, backend=backend).logp
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generate_new_tokens(student, batch):
    model, proc = student
    rows = generate("val", 2, seed=0)
    imgs = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    prompts = collate(proc, [r["problem"] for r in rows], imgs)
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left padded for generation
    out = model.generate(**prompts, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - prompts["input_ids"].shape[1] <= 6


def test_save_and_load_round_trip_through_real_loading_path(student, batch, tmp_path):
    model, proc = student
    path = save_pretrained(model, proc, tmp_path / "tiny")
    loaded, lproc = load_model(str(path), dtype="float32")
    torch.testing.assert_close(loaded(**model_inputs(batch)).logits, model(**model_inputs(batch)).logits)
    assert lproc.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert lproc.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        proc.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # saving again over an existing checkpoint replaces it atomically
    save_pretrained(model, proc, path)
    assert not list(tmp_path.glob(".tiny.*"))


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(str(tmp_path), dtype="float8")


def test_teacher_is_larger_and_shares_the_vocabulary(student):
    model, proc = student
    teacher, tproc = tiny_vlm("teacher", processor=proc)
    n_s = sum(p.numel() for p in model.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert n_t > 1.3 * n_s and teacher.lm_head.weight.shape[0] == model.lm_head.weight.shape[0]


def test_freezing_options():
    model, _ = tiny_vlm("student")
    freeze(model, vision=True)
    visual = model.model.visual
    assert not any(p.requires_grad for n, p in visual.named_parameters() if not n.startswith("merger."))
    assert all(p.requires_grad for p in visual.merger.parameters())
    freeze(model, projector=True)
    assert not any(p.requires_grad for p in visual.merger.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    freeze(model, llm=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_call_head_runs_the_loss_as_the_head_forward_and_restores_it(student, batch):
    model, _ = student
    hidden = trunk_hidden(model, **batch)
    seen = {}

    def fn(h, w):
        seen["weight_is_head"] = w is model.lm_head.weight
        return token_stats(h, w, batch["labels"]).logp.sum()

    out = call_head(model, hidden, fn)
    (g,) = torch.autograd.grad(out, model.lm_head.weight)
    assert seen["weight_is_head"] and g.abs().sum() > 0
    assert "forward" not in vars(model.lm_head)  # the class forward is back
    torch.testing.assert_close(model.lm_head(hidden), hidden @ model.lm_head.weight.T)


def test_matmul_patch_embed_equals_the_convolution():
    """PatchConv3d: the same output and gradients as the Conv3d it replaces, on a patch-shaped input;
    any other input shape falls back to the convolution."""
    from vlmfast.models import PatchConv3d, use_matmul_patch_embed

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False).double()
    fast = torch.nn.Sequential(copy.deepcopy(conv))
    assert use_matmul_patch_embed(fast) == 1 and isinstance(fast[0], PatchConv3d)
    assert fast[0].state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(37, 3, 2, 14, 14, dtype=torch.double, requires_grad=True)
    want = conv(x)
    got = fast(x)
    torch.testing.assert_close(got, want)
    gw, gx = torch.autograd.grad(want.square().sum(), (conv.weight, x))
    fw, fx = torch.autograd.grad(got.square().sum(), (fast[0].weight, x))
    torch.testing.assert_close(fw, gw)
    torch.testing.assert_close(fx, gx)
    big = torch.randn(2, 3, 4, 28, 28, dtype=torch.double)  # not one patch: the convolution runs
    torch.testing.assert_close(fast(big), conv(big))


def test_tiny_models_use_the_matmul_patch_embed(student):
    from vlmfast.models import PatchConv3d

    assert any(isinstance(m, PatchConv3d) for m in student[0].modules())


def test_an_image_repeated_in_consecutive_rows_is_encoded_once(student):
    """GRPO's group of samples of one prompt: the vision tower sees each distinct image once, yet the
    hidden states equal the plain forward's and every gradient (the vision tower's sums over the copies)
    matches to fp32 summation order; generation from the shared encode gives the same tokens."""
    from vlmfast.models import shared_images
    from vlmfast.rollout import HFEngine, Sampling

    model, proc = copy.deepcopy(student)
    rows = generate("train", 2, seed=1)
    imgs = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    problems = [r["problem"] for r in rows for _ in range(3)]
    images = [im for im in imgs for _ in range(3)]
    b = collate(proc, problems, images, [f"<think>x</think> \\boxed{{{k}}}" for k in range(6)])
    seen = []
    hook = model.model.visual.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(int(kwargs["grid_thw"].shape[0])), with_kwargs=True)
    plain = {k: v for k, v in model_inputs(b).items()}
    g = torch.randn(*b["input_ids"].shape, model.config.text_config.hidden_size,
                    generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for inputs in (plain, "shared"):
        inputs = shared_images(model, plain) if inputs == "shared" else inputs
        h = model.model(**inputs, use_cache=False).last_hidden_state
        grads.append((h.detach(), torch.autograd.grad((h * g).sum(), params, allow_unused=True)))
    hook.remove()
    assert seen == [6, 2]  # images through the vision tower: every copy, then each distinct image once
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-6)
    for a, c in zip(grads[0][1], grads[1][1]):
        if a is not None:
            assert (a - c).abs().max() <= 1e-5 * a.abs().max().clamp(min=1e-12)
    assert trunk_hidden(model, **b).shape == grads[0][0].shape
    # nothing repeats: the batch goes through unchanged
    assert shared_images(model, model_inputs(collate(proc, [r["problem"] for r in rows], imgs, ["a", "b"]))) \
        .get("mm_encoder_outputs") is None
    engine = HFEngine(model, proc)
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    shared = engine.generate([r["problem"] for r in rows], imgs, n=3, sampling=greedy)
    import vlmfast.rollout.hf as hf

    real, hf.shared_images = hf.shared_images, lambda model, batch: batch
    try:
        unshared = engine.generate([r["problem"] for r in rows], imgs, n=3, sampling=greedy)
    finally:
        hf.shared_images = real
    assert [[c.token_ids for c in g] for g in shared] == [[c.token_ids for c in g] for g in unshared]


def test_images_alike_in_pixels_but_not_in_shape_are_encoded_apart(student):
    """Two blank images of the same patch count in consecutive rows, one tall and one wide: their patches are equal
    value for value, but their grids lay them out differently, so neither is a copy of the other."""
    from vlmfast.models import shared_images

    model, proc = student
    tall, wide = Image.new("RGB", (56, 112), (90, 90, 90)), Image.new("RGB", (112, 56), (90, 90, 90))
    b = model_inputs(collate(proc, ["<image>how many?"] * 2, [[tall], [wide]]))
    grid = b["image_grid_thw"]
    assert grid[0].prod() == grid[1].prod() and not torch.equal(grid[0], grid[1])
    assert torch.equal(b["pixel_values"][: int(grid[0].prod())], b["pixel_values"][int(grid[0].prod()):])
    assert shared_images(model, b).get("mm_encoder_outputs") is None
