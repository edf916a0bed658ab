"""HF engine: n samples per prompt with images, seeds reproduce, sampler log-probs equal a forward
pass at the same temperature, stop at the end of turn, scoring, the mismatch metric."""

import dataclasses
import io
import math
import weakref

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from vlmfast.data.synthetic import generate
from vlmfast.models import tiny_vlm
from vlmfast.rollout import Sampling, make_engine, mismatch
from vlmfast.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def engine():
    model, proc = tiny_vlm("student", seed=0)
    return make_engine("hf", model, proc, batch_size=16)


@pytest.fixture(scope="module")
def prompts():
    rows = generate("val", 3, seed=4)
    return [r["problem"] for r in rows], [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]


def test_n_samples_per_prompt_and_seeds_reproduce(engine, prompts):
    problems, images = prompts
    s = Sampling(temperature=1.0, max_new_tokens=12, seed=7)
    a = engine.generate(problems, images, n=4, sampling=s)
    b = engine.generate(problems, images, n=4, sampling=s)
    assert len(a) == 3 and all(len(group) == 4 for group in a)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    c = engine.generate(problems, images, n=4, sampling=Sampling(temperature=1.0, max_new_tokens=12, seed=8))
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]
    assert len({tuple(x.token_ids) for x in a[0]}) > 1  # samples differ within a group
    for g in a:
        for comp in g:
            assert len(comp.logprobs) == len(comp.token_ids) and all(lp <= 0 for lp in comp.logprobs)
            assert comp.finish_reason in ("stop", "length", "vision_token")
            assert comp.finish_reason != "stop" or comp.token_ids[-1] == engine.eos_id
            assert not set(comp.token_ids) & engine.vision_ids


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_match_a_forward_pass(engine, prompts, temperature):
    problems, images = prompts
    out = engine.generate(problems, images, n=2, sampling=Sampling(temperature=temperature, max_new_tokens=10,
                                                                   seed=1))
    flat = [c for g in out for c in g]
    rep_p = [p for p in problems for _ in range(2)]
    rep_i = [i for i in images for _ in range(2)]
    scored = engine.score(rep_p, rep_i, [c.token_ids for c in flat], temperature=temperature)
    assert mismatch([c.logprobs for c in flat], scored) < 1e-4


def _biased_head(model, token, other=None):
    """Replace the lm_head by one whose logits are a constant bias: `token` always wins."""
    H, V = model.lm_head.weight.shape[1], model.lm_head.weight.shape[0]
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[token] = 10.0
    model.lm_head = head


def test_stops_at_end_of_turn_or_length(prompts):
    model, proc = tiny_vlm("student", seed=0)
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _biased_head(model, eos)
    out = make_engine("hf", model, proc).generate(*prompts, n=2, sampling=Sampling(temperature=1.0, max_new_tokens=6))
    assert all(c.token_ids == [eos] and c.finish_reason == "stop" for g in out for c in g)
    assert all(abs(c.logprobs[0]) < 1e-6 for g in out for c in g)
    other = proc.tokenizer("red", add_special_tokens=False)["input_ids"][0]  # an ordinary token
    _biased_head(model, other)
    out = make_engine("hf", model, proc).generate(*prompts, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=6))
    assert all(g[0].token_ids == [other] * 6 and g[0].finish_reason == "length" for g in out)
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    _biased_head(model, image_pad)  # a sampled vision token ends the completion before it
    out = make_engine("hf", model, proc).generate(*prompts, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=6))
    assert all(g[0].token_ids == [] and g[0].finish_reason == "vision_token" for g in out)


def test_greedy_is_deterministic_without_seed(engine, prompts):
    a = engine.generate(*prompts, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    b = engine.generate(*prompts, n=1, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]


def test_bad_sampling_and_batch():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("tgi", None, None)
    with pytest.raises(ValueError, match="differ in length"):
        mismatch([[0.1, 0.2]], [[0.1]])


def test_end_of_completion_rules():
    from vlmfast.rollout.base import end_of_completion

    assert end_of_completion([5, 6, 2, 7], eos_id=2, vision_ids={9}) == ([5, 6, 2], "stop")
    assert end_of_completion([5, 9, 2], eos_id=2, vision_ids={9}) == ([5], "vision_token")
    assert end_of_completion([5, 6], eos_id=2, vision_ids={9}) == ([5, 6], "length")


def test_per_prompt_seeds_are_batch_invariant_and_logprobs_exact(engine, prompts):
    """With `seeds`, a prompt's samples depend on its own seed only: the same alone or in a batch
    (all prompts go through one generate call), and the recorded log-probs equal a forward pass."""
    problems, images = prompts
    s = Sampling(temperature=0.8, max_new_tokens=10)
    batch = engine.generate(problems, images, n=3, sampling=s, seeds=[11, 22, 33])
    alone = engine.generate(problems[1:2], images[1:2], n=3, sampling=s, seeds=[22])
    assert [c.token_ids for c in batch[1]] == [c.token_ids for c in alone[0]]
    assert len({tuple(c.token_ids) for c in batch[1]}) > 1  # the n samples of a prompt differ
    other = engine.generate(problems, images, n=3, sampling=s, seeds=[11, 99, 33])
    assert [c.token_ids for c in other[1]] != [c.token_ids for c in batch[1]]
    flat = [c for g in batch for c in g]
    scored = engine.score([p for p in problems for _ in range(3)], [i for i in images for _ in range(3)],
                          [c.token_ids for c in flat], temperature=0.8)
    assert mismatch([c.logprobs for c in flat], scored) < 1e-4


def test_seeded_sampling_draws_from_the_tempered_distribution(prompts):
    """Gumbel-max with per-row noise samples softmax(logits / T): two tokens at logits 1 and 0 with
    T = 0.5 give p = e^2 / (1 + e^2) = 0.881 for the first."""
    model, proc = tiny_vlm("student", seed=0)
    a, b = (proc.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue"))
    H, V = model.lm_head.weight.shape[1], model.lm_head.weight.shape[0]
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[a], head.bias[b] = 1.0, 0.0
    model.lm_head = head
    problems, images = prompts
    out = make_engine("hf", model, proc, batch_size=400).generate(
        problems[:1], images[:1], n=400, sampling=Sampling(temperature=0.5, max_new_tokens=1), seeds=[5])
    first = [g.token_ids[0] for g in out[0]]
    share = first.count(a) / len(first)
    assert set(first) <= {a, b} and abs(share - 0.881) < 0.05  # 400 draws: sd 0.016
    p_a = math.exp(2) / (1 + math.exp(2))  # 0.881 (not rounded: log(0.119) is 1.7e-3 off)
    assert abs(out[0][0].logprobs[0] - math.log(p_a if first[0] == a else 1 - p_a)) < 1e-4


@pytest.fixture(scope="module")
def mixed_prompts(prompts):
    """Prompts with 2, 0 and 1 images (the batch's rows hold different numbers of images)."""
    a, b, c = (ims[0] for ims in prompts[1])
    return (["<image><image>Which image has more shapes?", "How many sides has a square?", prompts[0][2]],
            [[a, b.resize((56, 84))], [], [c]])


@pytest.mark.parametrize("which", ["one image each", "2, 0 and 1 images"])
def test_prompt_prefill_runs_once_per_prompt_and_changes_nothing(engine, prompts, mixed_prompts, which):
    """n copies of a prompt: its prefill runs on one row (all but its last token), the cache is repeated for
    the copies, and the samples and their log-probs are those of the plain n-row generation."""
    problems, images = prompts if which == "one image each" else mixed_prompts
    n, s = 4, Sampling(temperature=1.0, max_new_tokens=8)
    rep_p, rep_i = [p for p in problems for _ in range(n)], [i for i in images for _ in range(n)]
    seeds = list(range(len(rep_p)))
    inner = engine.model.model
    rows_seen = []
    hook = inner.register_forward_pre_hook(lambda m, a, k: rows_seen.append(tuple(k["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            shared = engine._generate_batch(rep_p, rep_i, s, seeds, copies=n)
            first_call, rows_seen[:] = rows_seen[0], []
            plain = engine._generate_batch(rep_p, rep_i, s, seeds, copies=1)
    finally:
        hook.remove()
    prompt_len = rows_seen[0][1]
    assert first_call == (len(problems), prompt_len - 1)  # one row per prompt, all but its last token
    assert rows_seen[0] == (len(rep_p), prompt_len)  # the plain path's prefill: every copy, every token
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]
    assert mismatch([c.logprobs for c in shared], [c.logprobs for c in plain]) < 1e-5


def test_prompt_prefill_needs_runs_of_identical_rows(engine, prompts):
    from vlmfast.data.collate import collate
    from vlmfast.rollout.hf import _first_of_runs

    problems, images = prompts
    runs = collate(engine.processor, [p for p in problems for _ in range(2)], [i for i in images for _ in range(2)])
    assert _first_of_runs(runs, 2).tolist() == [0, 2, 4]
    assert _first_of_runs(runs, 3) is None  # 6 rows are not runs of 3
    mixed = collate(engine.processor, problems + problems, images + images)
    assert _first_of_runs(mixed, 2) is None  # rows 0 and 1 differ


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensors made by ops inside the mode that are alive at once (each storage counted once,
    whether held by the tensor an op made or by a view of it)."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, tuple[list, int]] = {}  # storage pointer -> (weak refs of its tensors, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                refs, size = self.alive.get(ptr, ([], t.untyped_storage().nbytes()))
                self.alive[ptr] = (refs + [weakref.ref(t)], size)
        self.alive = {p: ([r for r in refs if r() is not None], n) for p, (refs, n) in self.alive.items()
                      if any(r() is not None for r in refs)}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, seed=3), Sampling(temperature=0.0)],
                         ids=["sampled", "greedy"])
def test_generation_keeps_one_logprob_per_token_not_the_scores(prompts, sampling):
    """With Qwen2.5's real vocabulary (152064 columns, tiny hidden size), what generate keeps alive at once is
    O(B x V), a few [B, V] tensors of one step, and does not grow with the tokens decoded: never a [B, V] tensor
    per token ([B, L, V]; 48 more steps of scores would be 48 more [B, V])."""
    V = 152064
    model, proc = tiny_vlm("student", seed=0)
    real = len(proc.tokenizer)
    model.resize_token_embeddings(V, mean_resizing=False)
    with torch.no_grad():  # only the tokenizer's tokens can be drawn: the rest of the vocabulary is computed, masked
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[real:] = 0
    bias = torch.zeros(V)
    bias[real:] = -1e4
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    engine = make_engine("hf", model, proc, batch_size=16)
    bias[[engine.eos_id, *engine.vision_ids]] = -1e4  # every completion runs its full budget
    problems, images = prompts
    n = 2
    B = len(problems) * n
    row_bytes = B * V * 4
    peaks = {}
    for steps in (16, 64):
        with LiveBytes() as seen:
            out = engine.generate(problems, images, n=n, sampling=dataclasses.replace(sampling, max_new_tokens=steps),
                                  seeds=None if sampling.greedy else [1, 2, 3])
        assert all(len(c.token_ids) == len(c.logprobs) == steps for g in out for c in g)
        assert all(lp <= 0 for g in out for c in g for lp in c.logprobs)
        peaks[steps] = seen.peak / row_bytes
    assert peaks[64] < 24, peaks  # [B, V] fp32 tensors alive at once
    assert peaks[64] - peaks[16] < 2, peaks


class _EndOfTurnBoost(torch.nn.Module):
    """The lm_head with the end-of-turn logit raised: completions end at ragged lengths (a long tail)."""

    def __init__(self, head, eos, boost):
        super().__init__()
        self.head, self.weight, self.eos, self.boost = head, head.weight, eos, boost

    def forward(self, h):
        z = self.head(h)
        z[..., self.eos] += self.boost
        return z


def test_finished_rows_leave_the_decode_batch_and_change_nothing(prompts):
    """A long-tailed rollout: generate stops when half its rows have ended and the engine continues the rest alone
    (from their KV cache, their 3-D rope offsets and noise streams carried over). Every completion, finish reason
    and log-prob is the one the whole batch decoded to the longest's end gives, and the rows the language model
    decodes add up to less than half of that batch's (at most twice each step's unfinished rows)."""
    model, proc = tiny_vlm("student", seed=0)
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.lm_head = _EndOfTurnBoost(model.lm_head, eos, 3.5)
    decoded = []  # rows of each one-token (decode) forward
    model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: decoded.append(kw["inputs_embeds"].shape[0]) if kw["inputs_embeds"].shape[1] == 1
        else None, with_kwargs=True)
    s = Sampling(temperature=1.0, max_new_tokens=48)
    runs = {}
    for drop in (False, True):
        decoded.clear()
        out = HFEngine(model, proc, drop_finished=drop).generate(*prompts, n=8, sampling=s, seeds=[5, 6, 7])
        runs[drop] = [c for g in out for c in g], sum(decoded)
    (whole, whole_rows), (dropped, dropped_rows) = runs[False], runs[True]
    lengths = [len(c.token_ids) for c in whole]
    assert max(lengths) > 3 * sorted(lengths)[len(lengths) // 2]  # a long tail: the longest far past the median
    assert [c.token_ids for c in dropped] == [c.token_ids for c in whole]
    assert [c.finish_reason for c in dropped] == [c.finish_reason for c in whole]
    assert mismatch([c.logprobs for c in dropped], [c.logprobs for c in whole]) < 1e-5
    assert dropped_rows <= 2 * sum(lengths) and dropped_rows < whole_rows / 2, (dropped_rows, whole_rows)
