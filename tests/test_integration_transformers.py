"""apply_vlmfast against the unpatched model, i.e. transformers' own loss (its ForCausalLMLoss on materialised
logits): the same loss and every gradient, with and without num_items_in_batch, on a text model and on the
tiny Qwen2.5-VL with images; no logits with labels; without labels and in generate, the model unchanged."""

import copy
import io

import pytest
import torch
from PIL import Image

from vlmfast.integrations.transformers import apply_vlmfast, remove_vlmfast


def _text_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return Qwen2ForCausalLM(cfg)


def _text_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1000, (3, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding
    labels = ids.clone()
    labels[:, :9] = -100  # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _vlm_batch(proc):
    from vlmfast.data.collate import collate
    from vlmfast.data.synthetic import generate

    rows = generate("train", 2, seed=0)
    images = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    b = collate(proc, [r["problem"] for r in rows], images, ["<think>three</think> \\boxed{3}", "\\boxed{red}"])
    labels = b["input_ids"].clone()  # HF's unshifted labels: the response tokens where they sit
    shifted = b["labels"]  # vlmfast's: labels[t] = input_ids[t + 1] in the response
    labels[:, 1:] = torch.where(shifted[:, :-1] != -100, b["input_ids"][:, 1:], torch.full_like(labels[:, 1:], -100))
    labels[:, 0] = -100
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
              if k in b}
    return inputs, labels


def _loss_and_grads(model, inputs, labels, **kw):
    model.zero_grad()
    out = model(**inputs, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _same(a, b, what):
    for name in a[1]:
        ga, gb = a[1][name], b[1][name]
        assert (ga - gb).abs().max() <= 1e-5 * max(ga.abs().max().item(), 1e-8), (what, name)
    assert set(a[1]) == set(b[1]) and len(a[1]) > 5
    assert abs(a[0].loss.item() - b[0].loss.item()) <= 1e-5 * abs(a[0].loss.item()), what


@pytest.mark.parametrize("kind", ["text", "vlm"])
@pytest.mark.parametrize("num_items", [None, 23])
def test_patched_loss_and_gradients_equal_transformers_own(kind, num_items):
    if kind == "text":
        hf, (inputs, labels) = _text_model(), _text_batch()
    else:
        from vlmfast.models import tiny_vlm

        hf, proc = tiny_vlm("student", seed=0)
        inputs, labels = _vlm_batch(proc)
    fused = apply_vlmfast(copy.deepcopy(hf))
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    want = _loss_and_grads(hf, inputs, labels, **kw)
    got = _loss_and_grads(fused, inputs, labels, **kw)
    _same(got, want, f"{kind}, num_items_in_batch={num_items}")
    assert got[0].logits is None and want[0].logits is not None
    if num_items is not None:  # a sum over 23: not the mean over this batch's own token count
        assert abs(got[0].loss.item() * 23 / (labels[:, 1:] != -100).sum().item() -
                   _loss_and_grads(fused, inputs, labels)[0].loss.item()) < 1e-4


def test_return_dict_false_gives_hfs_tuple_with_the_fused_loss_first():
    hf = _text_model()
    fused = apply_vlmfast(copy.deepcopy(hf))
    inputs, labels = _text_batch()
    want = hf(**inputs, labels=labels, return_dict=False)
    got = fused(**inputs, labels=labels, return_dict=False)
    assert isinstance(got, tuple) and isinstance(want, tuple)
    assert abs(got[0].item() - want[0].item()) <= 1e-5 * abs(want[0].item())  # HF's tuple: the loss first


def test_without_labels_and_in_generate_the_model_is_unchanged():
    hf = _text_model().eval()
    fused = apply_vlmfast(copy.deepcopy(hf))
    inputs, _ = _text_batch()
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).logits, hf(**inputs).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        one = {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1]}
        assert torch.equal(fused.generate(**one, **kw), hf.generate(**one, **kw))
    remove_vlmfast(fused)
    assert fused(**inputs, labels=_text_batch()[1]).logits is not None  # removed: HF's own path again


def test_token_stats_on_the_output_equal_the_materialised_ones():
    hf = _text_model()
    fused = apply_vlmfast(copy.deepcopy(hf), return_token_stats=True)
    inputs, labels = _text_batch()
    out = fused(**inputs, labels=labels)
    with torch.no_grad():
        lsm = torch.log_softmax(hf(**inputs).logits.float(), -1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    mask = shifted != -100
    logp = torch.where(mask, lsm.gather(-1, shifted.clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    entropy = -(lsm.exp() * lsm).sum(-1)
    torch.testing.assert_close(out.token_logp, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.token_entropy[mask], entropy[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, -(logp * mask).sum() / mask.sum(), atol=1e-5, rtol=1e-5)


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match=r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported"):
        apply_vlmfast(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    model = _text_model()
    with pytest.raises(ValueError, match="logits_to_keep"):
        inputs, labels = _text_batch()
        apply_vlmfast(model)(**inputs, labels=labels, logits_to_keep=1)
