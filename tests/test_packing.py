"""Padding-free forwards (vlmfast/packing.py) equal the padded batch: the tiny Qwen2.5-VL with images of different
sizes, sequences of very different lengths, rows sharing an image (a GRPO group), rows without one, left and right
padding; hidden states at every real token, every loss of the stages and every gradient, fp32. The whole trainer,
packed on 2 ZeRO-3 ranks against padded in one process, is tests/test_zero3_all_paths.py."""

import io

import pytest
import torch
from PIL import Image

import vlmfast
from vlmfast.data.collate import collate, collate_token_responses
from vlmfast.data.synthetic import generate
from vlmfast.models import call_head, trunk_hidden
from vlmfast.packing import pack, use_packed_forward


@pytest.fixture(scope="module")
def model_proc():
    from vlmfast.models import tiny_vlm

    model, proc = tiny_vlm("student", seed=0)
    return model.eval(), proc


@pytest.fixture(scope="module")
def rows():
    rs = generate("train", 4, seed=3)
    images = [[Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB")] for r in rs]
    images[1] = [images[1][0].resize((56, 112))]  # another grid: its own mRoPE span
    images[3] = [images[3][0].resize((112, 56))]
    return [r["problem"] for r in rs], images


def _both(model, fn):
    """fn() with the model padded, then packed."""
    out = []
    for on in (False, True):
        use_packed_forward(model, on)
        out.append(fn())
    use_packed_forward(model, False)
    return out


def _hidden_close(model, batch):
    padded, packed = _both(model, lambda: trunk_hidden(model, **batch))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed[real], padded[real], atol=2e-5, rtol=1e-5)
    assert (packed[~real] == 0).all()
    return real


def test_hidden_states_equal_at_every_real_token(model_proc, rows):
    model, proc = model_proc
    problems, images = rows
    responses = ["x", "a much longer answer with many words in it " * 6 + "\\boxed{3}", "", "two \\boxed{2}"]
    right = collate(proc, problems, images, responses)  # training: right padded
    real = _hidden_close(model, right)
    assert real.float().mean() < 0.6  # the case is mostly padding: what packing saves
    _hidden_close(model, collate(proc, problems, images))  # generation prompts: left padded


def test_a_group_sharing_its_image_and_text_only_rows(model_proc, rows):
    model, proc = model_proc
    problems, images = rows
    g = torch.Generator().manual_seed(0)
    rep_p, rep_i = [problems[0]] * 3 + [problems[1]] * 3, [images[0]] * 3 + [images[1]] * 3
    responses = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (1, 40, 7, 25, 2, 60)]
    _hidden_close(model, collate_token_responses(proc, rep_p, rep_i, responses))  # shared_images path
    _hidden_close(model, collate(proc, ["what is 2 + 2?", "and 3?"], [[], []], ["four", "it is three, \\boxed{3}"]))


def _loss_and_grads(model, batch, loss_fn):
    model.zero_grad()
    loss = call_head(model, trunk_hidden(model, **batch), loss_fn)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["sft", "grpo", "dpo"])
def test_losses_and_every_gradient_equal(model_proc, rows, loss):
    model, proc = model_proc
    problems, images = rows
    responses = ["x", "a much longer answer " * 8 + "\\boxed{3}", "\\boxed{1}", "two \\boxed{2}"]
    b = collate(proc, problems, images, responses)
    y = b["labels"]
    if loss == "sft":
        def fn(h, w):
            return vlmfast.sft_loss(h, w, y)
    elif loss == "grpo":  # per-sequence advantages, a moved old policy, per-sequence means
        old = torch.where(y != -100, -torch.rand(y.shape) - 4.0, 0.0)
        adv = torch.tensor([1.0, -0.5, 0.25, -1.0])

        def fn(h, w):
            return vlmfast.grpo_loss(h, w, y, old, adv, aggregation="seq-mean-token-mean")
    else:  # rows [:2] chosen, [2:] rejected: pairs of very different lengths
        def fn(h, w):
            return vlmfast.dpo_loss(h, w, y, torch.full((2,), -30.0), torch.full((2,), -20.0), beta=0.5)
    (l_pad, g_pad), (l_pack, g_pack) = _both(model, lambda: _loss_and_grads(model, b, fn))
    torch.testing.assert_close(l_pack, l_pad, atol=1e-6, rtol=1e-5)
    assert g_pad.keys() == g_pack.keys() and any(".visual." in f".{n}" for n in g_pad)  # the vision tower too
    for name in g_pad:
        scale = max(1.0, g_pad[name].abs().max().item())
        assert (g_pack[name] - g_pad[name]).abs().max().item() <= 1e-4 * scale, name


def test_packed_inputs_restart_positions_per_sequence(model_proc, rows):
    """The packed row's text positions restart at 0 at each sequence (what transformers reads as packed) and
    its 3-D positions are each sequence's own (get_rope_index of the padded batch at the real tokens)."""
    model, proc = model_proc
    problems, images = rows
    b = collate(proc, problems, images, ["x", "yy", "zzz", "w"])
    inputs, real = pack(model, b)
    lengths = real.sum(1).tolist()
    pos = inputs["position_ids"]
    assert pos.shape == (4, 1, sum(lengths)) and inputs["input_ids"].shape == (1, sum(lengths))
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    assert (pos[0, 0, starts] == 0).all() and (pos[0, 0] == 0).sum() == len(lengths)
    own, _ = type(model.model).get_rope_index(model.model, b["input_ids"], b["mm_token_type_ids"],
                                             image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"])
    assert torch.equal(pos[1:, 0], own[:, real])


def test_varlen_sdpa_attends_within_each_sequence_only():
    """The packed row's SDPA attention (one causal SDPA per sequence span) against SDPA with the block-diagonal
    causal mask over the whole row, grouped-query heads included; with a mask it is plain SDPA."""
    from types import SimpleNamespace

    from vlmfast.packing import varlen_sdpa_attention

    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 17, 9]
    n = sum(lengths)
    q = torch.randn(1, 4, n, 8, generator=g)
    k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)  # 2 query heads per key head
    positions = torch.cat([torch.arange(x) for x in lengths])[None]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=allowed, scale=0.3)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    got, _ = varlen_sdpa_attention(module, q, k, v, None, scaling=0.3, position_ids=positions)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=1e-6)
    masked, _ = varlen_sdpa_attention(module, q, k, v, allowed[None, None], scaling=0.3, position_ids=positions)
    torch.testing.assert_close(masked, want.transpose(1, 2), atol=1e-6, rtol=1e-6)


def _family(name: str, like):
    """A tiny Qwen2-VL or Qwen3-VL (random weights) with the tiny Qwen2.5-VL's text sizes and token ids: the same
    processor feeds all three (patch 14, merge 2)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    t = like.config.text_config.to_dict()
    text = {k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                              "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {k: getattr(like.config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                "vision_end_token_id")}
    patches = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    torch.manual_seed(0)
    if name == "qwen2_vl":
        cfg = Qwen2VLConfig(text_config=text, tie_word_embeddings=False, **ids, vision_config={
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, **patches})
        model = Qwen2VLForConditionalGeneration(cfg)
    else:  # interleaved mRoPE, deepstack features from the first vision layer, a learned position grid
        text = {**text, "head_dim": t["hidden_size"] // t["num_attention_heads"],
                "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True}}
        cfg = Qwen3VLConfig(text_config=text, tie_word_embeddings=False, **ids, vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0], **patches})
        model = Qwen3VLForConditionalGeneration(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen2_vl_and_qwen3_vl_pack_too(model_proc, rows, family):
    """The other supported families: the packed row (one row reaches the language model) gives the padded batch's
    hidden states, loss and gradients, images of different grids included."""
    like, proc = model_proc
    model = _family(family, like)
    problems, images = rows
    b = collate(proc, problems, images, ["x", "a much longer answer " * 8 + "\\boxed{3}", "\\boxed{1}", "two"])
    widths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append(kw["inputs_embeds"].shape[:2]), with_kwargs=True)
    _hidden_close(model, b)
    hook.remove()
    assert widths == [b["input_ids"].shape, (1, int(b["attention_mask"].sum()))]  # padded, then one packed row
    y = b["labels"]
    (l_pad, g_pad), (l_pack, g_pack) = _both(model, lambda: _loss_and_grads(model, b, lambda h, w: vlmfast.sft_loss(
        h, w, y)))
    torch.testing.assert_close(l_pack, l_pad, atol=1e-6, rtol=1e-5)
    assert g_pad.keys() == g_pack.keys() and any(".visual." in f".{n}" for n in g_pad)
    for name in g_pad:
        scale = max(1.0, g_pad[name].abs().max().item())
        assert (g_pack[name] - g_pad[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_text_models_pack_too(model_proc, family):
    """Qwen2/2.5 and Qwen3 text models (positions restarting per sequence: transformers' packed convention for
    text models): the packed row gives the padded batch's hidden states, loss and gradients."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    _, proc = model_proc
    config, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(0)
    model = cls(config(vocab_size=len(proc.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                       pad_token_id=proc.tokenizer.pad_token_id)).eval()
    model.config._attn_implementation = "sdpa"
    b = collate(proc, ["what is 2 + 2?", "name the colour of the largest of the shapes", "and 3?"], [[], [], []],
                ["four", "it is red, the largest " * 5 + "\\boxed{red}", "\\boxed{3}"])
    widths = []
    hook = model.model.register_forward_pre_hook(lambda mod, args, kw: widths.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
    _hidden_close(model, b)
    hook.remove()
    assert widths == [b["input_ids"].shape, (1, int(b["attention_mask"].sum()))]
    y = b["labels"]
    (l_pad, g_pad), (l_pack, g_pack) = _both(model, lambda: _loss_and_grads(model, b, lambda h, w: vlmfast.sft_loss(
        h, w, y)))
    torch.testing.assert_close(l_pack, l_pad, atol=1e-6, rtol=1e-5)
    for name in g_pad:
        scale = max(1.0, g_pad[name].abs().max().item())
        assert (g_pack[name] - g_pad[name]).abs().max().item() <= 1e-4 * scale, name
