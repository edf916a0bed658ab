"""SFT with gentle negatives in TRL's SFTTrainer, for real (TRL 1.16, CPU, a tiny Qwen2 text model): with lam = 0
it is TRL's own SFT loss and gradients; with the hinge active its loss is NLL(y+) + lam mean_i (margin - NLL_i(y-)),
each negative's NLL over its tokens after the reasoning it shares with its completion, computed here row by row
from the model's materialised logits; training moves the weights and logs nll_pos / nll_neg."""

import copy

import pytest
import torch
from test_trl_cw_dpo import _model_and_tokenizer


def _data():
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [f"How many red shapes? {n}" for n in range(8)],
        "completion": [f"<think>I count.</think> \\boxed{{{n}}}" for n in range(8)],
        "negative": [f"<think>I count.</think> \\boxed{{{n + 1}}}" for n in range(8)],  # same reasoning
    })


def _args(tmp_path, name):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0)


def _nll(model, batch):
    """Mean token NLL of the labelled tokens, from full logits (HF's unshifted labels)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(lp * mask).sum() / mask.sum()


def _own_nll_per_negative(model, positives, negatives):
    """[B] mean NLL of each negative's tokens after the prefix its labelled tokens share with its positive's."""
    logits = model(input_ids=negatives["input_ids"], attention_mask=negatives["attention_mask"]).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1)
    out = []
    for i in range(len(logits)):
        pos = [int(t) for t in positives["labels"][i, 1:] if t != -100]
        where = [t for t, tok in enumerate(negatives["labels"][i, 1:].tolist()) if tok != -100]
        k = 0
        while k < min(len(pos), len(where)) and int(negatives["labels"][i, 1 + where[k]]) == pos[k]:
            k += 1
        assert 0 < k < len(where)  # the test's negatives share their reasoning, then differ
        out.append(-torch.stack([lp[i, t, negatives["labels"][i, 1 + t]] for t in where[k:]]).mean())
    return torch.stack(out)


def _grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_gentle_sft_is_trls_sft_at_lam_0_and_the_formula_with_the_hinge(tmp_path):
    from trl import SFTTrainer

    from vlmfast.integrations.trl import GentleSFTTrainer

    model, tok = _model_and_tokenizer()
    data = _data()
    gentle = GentleSFTTrainer(model=copy.deepcopy(model), args=_args(tmp_path, "g"), train_dataset=data,
                              processing_class=tok, lam=0.0)
    batch = gentle._prepare_inputs(next(iter(gentle.get_train_dataloader())))
    assert "negative_input_ids" in batch and batch["negative_labels"].ne(-100).sum() > 0
    plain = SFTTrainer(model=copy.deepcopy(model), args=_args(tmp_path, "p"), train_dataset=data.remove_columns(
        "negative"), processing_class=tok)
    positives = {k: v for k, v in batch.items() if not k.startswith("negative_")}
    want, want_g = _grads(plain, positives)
    got, got_g = _grads(gentle, batch)
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    assert set(got_g) == set(want_g) and len(want_g) > 10
    for n in want_g:
        assert (got_g[n] - want_g[n]).abs().max() <= 1e-5 * want_g[n].abs().max().clamp(min=1e-8), n
    # the hinge: margin above NLL(y-), so it pushes
    hinge = GentleSFTTrainer(model=copy.deepcopy(model), args=_args(tmp_path, "h"), train_dataset=data,
                             processing_class=tok, lam=0.5, margin=50.0)
    loss = hinge.compute_loss(hinge.model, dict(batch)).item()
    negatives = {k.removeprefix("negative_"): v for k, v in batch.items() if k.startswith("negative_")}
    with torch.no_grad():
        want = _nll(hinge.model, positives) + 0.5 * (50.0 - _own_nll_per_negative(hinge.model, positives,
                                                                                   negatives)).mean()
    assert abs(loss - want.item()) < 1e-4 * abs(want.item())


def test_gentle_sft_runs_the_head_in_one_pass(tmp_path, head_calls):
    """Positives and negatives each through vlmfast's one pass (token_loss), in the positives' forward; nothing
    recomputes the head in a backward."""
    from vlmfast.integrations.trl import GentleSFTTrainer

    model, tok = _model_and_tokenizer()
    trainer = GentleSFTTrainer(model=model, args=_args(tmp_path, "o"), train_dataset=_data(), processing_class=tok,
                               lam=0.5, margin=50.0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    assert head_calls == {"FusedLinearTokenLoss.forward": 2}, head_calls
    assert trainer.model.lm_head.weight.grad.abs().max() > 0


def test_gentle_sft_trains_and_logs(tmp_path):
    from vlmfast.integrations.trl import GentleSFTTrainer

    model, tok = _model_and_tokenizer()
    trainer = GentleSFTTrainer(model=model, args=_args(tmp_path, "t"), train_dataset=_data(), processing_class=tok,
                               lam=0.5, margin=50.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert sum(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters()) > 10
    logs = [h for h in trainer.state.log_history if "nll_pos" in h]
    assert len(logs) == 3 and all(h["hinge_active"] == 1.0 for h in logs)
    assert logs[-1]["nll_pos"] < logs[0]["nll_pos"]


def test_gentle_sft_gradient_accumulation_averages_the_micro_batches(tmp_path):
    """Its loss is a micro-batch's mean, so the Trainer must divide it by the accumulation steps: two micro-batches of
    2 give the gradient of one batch of 4 (equal token counts here), not twice it."""
    from transformers import TrainerCallback
    from trl import SFTConfig

    from vlmfast.integrations.trl import GentleSFTTrainer

    class Grads(TrainerCallback):
        def __init__(self):
            self.seen = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.seen is None:
                self.seen = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grads = []
    for batch, steps in ((4, 1), (2, 2)):
        model, tok = _model_and_tokenizer()
        args = SFTConfig(output_dir=str(tmp_path / f"ga{steps}"), per_device_train_batch_size=batch,
                         gradient_accumulation_steps=steps, max_steps=1, learning_rate=1e-3, report_to=[],
                         save_strategy="no", use_cpu=True, bf16=False, seed=0, max_grad_norm=0.0)
        cb = Grads()
        trainer = GentleSFTTrainer(model=model, args=args, train_dataset=_data(), processing_class=tok, lam=0.5,
                                   margin=50.0, callbacks=[cb])
        trainer.train()
        grads.append(cb.seen)
    one, accumulated = grads
    assert set(one) == set(accumulated) and len(one) > 10
    for n in one:
        assert (accumulated[n] - one[n]).abs().max() <= 1e-4 * one[n].abs().max().clamp(min=1e-8), n


def test_gentle_sft_evaluates_with_its_negatives(tmp_path):
    """An eval_dataset with negatives is prepared as the train one: evaluate() reports the same loss compute_loss
    gives its one batch, and the negatives' metrics."""
    from trl import SFTConfig

    from vlmfast.integrations.trl import GentleSFTTrainer

    model, tok = _model_and_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                     bf16=False, seed=0)
    trainer = GentleSFTTrainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data().select(range(4)),
                               processing_class=tok, lam=0.5, margin=50.0)
    out = trainer.evaluate()
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert abs(out["eval_loss"] - want) <= 1e-5 * abs(want) and "eval_nll_neg" in out, out


def test_gentle_sft_needs_its_negative_column(tmp_path):
    from vlmfast.integrations.trl import GentleSFTTrainer

    model, tok = _model_and_tokenizer()
    with pytest.raises(ValueError, match="missing: negative"):
        GentleSFTTrainer(model=model, args=_args(tmp_path, "e"), train_dataset=_data().remove_columns("negative"),
                         processing_class=tok)
    with pytest.raises(ValueError, match="eval_dataset columns .* missing: negative"):
        GentleSFTTrainer(model=model, args=_args(tmp_path, "e"), train_dataset=_data(),
                         eval_dataset=_data().remove_columns("negative"), processing_class=tok)
    with pytest.raises(ValueError, match="variant"):
        GentleSFTTrainer(model=model, args=_args(tmp_path, "e"), train_dataset=_data(), processing_class=tok,
                         variant="push")


@pytest.mark.parametrize("merging", ["packing", "padding_free"])
def test_gentle_sft_refuses_rows_that_hold_several_examples(tmp_path, merging):
    """Packed or padding-free batches put several examples (and so several negatives) in one row: the hinge would
    pair them wrongly, so the trainer says so before any work."""
    from trl import SFTConfig

    from vlmfast.integrations.trl import GentleSFTTrainer

    model, tok = _model_and_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path / merging), report_to=[], use_cpu=True, bf16=False, **{merging: True})
    with pytest.raises(ValueError, match=f"{merging} put several examples in one row"):
        GentleSFTTrainer(model=model, args=args, train_dataset=_data(), processing_class=tok)
