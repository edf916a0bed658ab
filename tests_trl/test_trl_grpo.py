"""vlmfast's head in TRL's GRPOTrainer, for real (TRL 1.16, CPU, the tiny Qwen2.5-VL): TRL's fused-head
protocol answered by vlmfast's op gives TRL's own per-token log-probs, entropies, loss and gradients; and a
few GRPO steps through VLMFastGRPOTrainer move the weights."""

import copy
import io

import pytest
import torch
from PIL import Image
from trl.trainer.utils import add_fused_lm_head

from vlmfast.data.collate import collate
from vlmfast.data.synthetic import generate
from vlmfast.integrations.trl import use_vlmfast_head
from vlmfast.models import tiny_vlm


@pytest.fixture(scope="module")
def student():
    return tiny_vlm("student", seed=0)


def _batch(proc):
    rows = generate("train", 2, seed=0)
    images = [[Image.open(io.BytesIO(r["images"][0]["bytes"]))] for r in rows]
    problems = [r["problem"] for r in rows for _ in range(2)]  # 2 samples per prompt, as GRPO groups them
    b = collate(proc, problems, [im for im in images for _ in range(2)],
                ["<think>three</think> \\boxed{3}", "\\boxed{4}", "<think>red</think> \\boxed{red}", "\\boxed{1}"])
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    labels[:, :-12] = -100  # the completion tokens, as TRL scores them (logits_to_keep)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    return inputs, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vlmfast_head_answers_trls_protocol_with_trls_numbers(student, temperature):
    model, proc = student
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=temperature, outputs=("log_probs", "entropy"))
    ours = copy.deepcopy(model)
    add_fused_lm_head(ours, temperature=temperature, outputs=("log_probs", "entropy"))
    use_vlmfast_head(ours, temperature=temperature)
    inputs, labels = _batch(proc)
    results = []
    for m in (trl_model, ours):
        m.zero_grad()
        out = m(**inputs, labels=labels, fused_lm_head=True)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (want, want_g), (got, got_g) = results
    mask = want.label_mask
    assert torch.equal(got.label_mask, mask) and mask.sum() > 20
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy[mask], want.entropy[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    assert set(got_g) == set(want_g) and len(want_g) > 20
    for name in want_g:
        scale = want_g[name].abs().max().clamp(min=1e-8)
        assert (got_g[name] - want_g[name]).abs().max() <= 1e-4 * scale, name
    # without fused_lm_head the model is TRL's / HF's as before
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, trl_model(**inputs).logits)


def _count_vlmfast_calls(monkeypatch) -> list:
    """A list that grows by one at every call of vlmfast's fused op."""
    import vlmfast.ops

    calls = []
    real = vlmfast.ops.token_stats
    monkeypatch.setattr(vlmfast.ops, "token_stats", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _grpo_inputs(student, tmp_path):
    """(the student saved as a folder, a 4-prompt dataset of the synthetic task, a reward that varies within a group,
    so advantages are not all zero): what both trainer tests hand TRL's GRPOTrainer."""
    from datasets import Dataset

    from vlmfast.data.prompts import messages

    model, proc = student
    model_dir = tmp_path / "model"
    copy.deepcopy(model).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    rows = generate("train", 4, seed=1)
    images = [Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB") for r in rows]
    data = Dataset.from_dict({"prompt": [messages(r["problem"]) for r in rows], "image": images})

    def reward(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(len(t) % 7) for t in texts]

    return model_dir, data, reward


def test_grpo_trainer_with_the_vlmfast_head_trains(student, tmp_path, monkeypatch):
    from trl import GRPOConfig

    from vlmfast.integrations.trl import VLMFastGRPOTrainer

    calls = _count_vlmfast_calls(monkeypatch)
    model_dir, data, reward = _grpo_inputs(student, tmp_path)
    proc = student[1]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, learning_rate=1e-2, max_steps=2, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, seed=0)
    trainer = VLMFastGRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                                 processing_class=proc)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "lm_head.weight" in moved and len(moved) > 10
    logs = [h for h in trainer.state.log_history if "entropy" in h]
    assert logs and all(0 < h["entropy"] < 10 for h in logs)
    assert len(calls) >= 2  # the training forwards went through vlmfast's op


def test_grpo_trainer_with_the_vlmfast_head_trains_lora_adapters(student, tmp_path, monkeypatch):
    """TRL's peft_config path: TRL wraps the policy with LoRA and takes its reference as the adapters switched off
    (beta > 0); vlmfast's head answers both passes, and only the adapters move."""
    from peft import LoraConfig
    from trl import GRPOConfig

    from vlmfast.integrations.trl import VLMFastGRPOTrainer

    calls = _count_vlmfast_calls(monkeypatch)
    model_dir, data, reward = _grpo_inputs(student, tmp_path)
    proc = student[1]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, learning_rate=5e-2, max_steps=2, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, seed=0, beta=0.1)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = VLMFastGRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                                 processing_class=proc, peft_config=peft_config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:5]
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert logs and all(h["kl"] >= 0 for h in logs) and any(h["kl"] > 0 for h in logs)
    assert len(calls) >= 4  # policy and adapters-off reference forwards through vlmfast's op
