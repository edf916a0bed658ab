"""CW-DPO in TRL's DPOTrainer, for real (TRL 1.16, CPU, a tiny Qwen2 text model): with a floor far below every
negative (w_c = 1) it is TRL's own sigmoid DPO, loss and every gradient; with the batch floor its loss is the
published formula computed here from TRL's own sequence log-probs; a few steps train and log the TRL way."""

import copy
import math

import pytest
import torch


def _model_and_tokenizer():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_tokenizer

    tok = build_tokenizer(corpus())
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")))
    return model, tok


def _data():
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [f"How many red shapes? {n}" for n in range(8)],
        "chosen": [f"<think>I count.</think> \\boxed{{{n}}}" for n in range(8)],
        "rejected": [f"\\boxed{{{n + 1}}} or maybe {n + 2}" for n in range(8)],
    })


def _trainer(cls, model, tok, tmp_path, **kw):
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, max_steps=3,
                     learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     beta=0.5, seed=0)
    return cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_data(), processing_class=tok,
               **kw)


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _moved(model, seed=1):
    torch.manual_seed(seed)  # a policy away from its reference, so the log-ratios are not 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def test_cw_dpo_with_a_low_floor_is_trls_dpo_and_with_the_batch_floor_the_formula(tmp_path):
    from trl import DPOTrainer

    from vlmfast.integrations.trl import CWDPOTrainer

    model, tok = _model_and_tokenizer()
    trl = _trainer(DPOTrainer, copy.deepcopy(model), tok, tmp_path)
    low = _trainer(CWDPOTrainer, copy.deepcopy(model), tok, tmp_path, l_floor=-1e9)
    batch = trl._prepare_inputs(next(iter(trl.get_train_dataloader())))
    for t in (trl, low):
        _moved(t.model)
    want, want_g = _loss_and_grads(trl, batch)
    got, got_g = _loss_and_grads(low, batch)
    # two fp32 implementations of the sequence sums (TRL's fused head; vlmfast's one pass): each token's log-prob
    # within ~1e-6 of the other's, ~20 of them summed per sequence
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())) and want.item() != math.log(2)
    assert set(got_g) == set(want_g) and len(want_g) > 10
    for n in want_g:
        assert (got_g[n] - want_g[n]).abs().max() <= 1e-5 * want_g[n].abs().max().clamp(min=1e-8), n
    # the batch floor: w_c from each rejected response's mean log-prob, TRL's own sequence log-probs
    cw = _trainer(CWDPOTrainer, copy.deepcopy(model), tok, tmp_path, tau_c=0.3)
    _moved(cw.model)
    loss = cw.compute_loss(cw.model, batch).item()
    mask = batch["completion_mask"][:, 1:]
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kw = {k: v for k, v in batch.items() if k not in ("completion_mask",)}
    with torch.no_grad():
        pol = cw.model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -mask.size(1):].sum(1)
        ref = cw.ref_model(**kw, labels=labels, fused_lm_head=True).log_probs[:, -mask.size(1):].sum(1)
    (pc, pr), (rc, rr) = pol.chunk(2), ref.chunk(2)
    lbar = pr / mask.chunk(2)[1].sum(1)
    w = torch.sigmoid((lbar - lbar.mean()) / 0.3)
    want = -torch.nn.functional.logsigmoid(0.5 * ((pc - rc) - w * (pr - rr))).mean().item()
    assert abs(loss - want) < 1e-5 and 0 < w.min() < w.max() < 1


def test_cw_dpo_runs_the_policys_head_in_one_pass(tmp_path, head_calls):
    """The policy's lm_head runs vlmfast's one pass (token_loss: its gradients made in the forward, 3 GEMMs), the
    reference's a token_stats forward; nothing recomputes the head in a backward (4 GEMMs)."""
    from vlmfast.integrations.trl import CWDPOTrainer

    model, tok = _model_and_tokenizer()
    trainer = _trainer(CWDPOTrainer, model, tok, tmp_path)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch).backward()
    assert head_calls == {"FusedLinearTokenLoss.forward": 1, "FusedLinearTokenStats.forward": 1}, head_calls
    assert trainer.model.lm_head.weight.grad.abs().max() > 0


def test_cw_dpo_with_precomputed_reference_log_probs_is_the_same_loss(tmp_path):
    """precompute_ref_log_probs=True (no reference model kept): the batch carries the reference's sequence sums,
    computed by TRL at start-up, and the loss is the one a kept reference gives."""
    from trl import DPOConfig

    from vlmfast.integrations.trl import CWDPOTrainer

    model, tok = _model_and_tokenizer()
    kept = _trainer(CWDPOTrainer, copy.deepcopy(model), tok, tmp_path, tau_c=0.3)
    args = DPOConfig(output_dir=str(tmp_path / "pre"), per_device_train_batch_size=4, max_steps=3, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, beta=0.5, seed=0, precompute_ref_log_probs=True)
    pre = CWDPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=_data(), processing_class=tok, tau_c=0.3)
    assert pre.ref_model is None
    losses = []
    for t in (kept, pre):
        _moved(t.model)
        batch = t._prepare_inputs(next(iter(t.get_train_dataloader())))
        losses.append(t.compute_loss(t.model, batch).item())
    assert "ref_chosen_logps" in batch and abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), losses


def test_cw_dpo_trains_and_logs_the_trl_way(tmp_path):
    from vlmfast.integrations.trl import CWDPOTrainer

    model, tok = _model_and_tokenizer()
    trainer = _trainer(CWDPOTrainer, model, tok, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert sum(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters()) > 10
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(logs) == 3
    for h in logs:
        assert 0 <= h["cooling_weight/mean"] <= 1 and 0 <= h["cooling_weight/frac_below_0.1"] <= 1
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "entropy"} <= set(h)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]


def test_cw_dpo_rejects_what_it_does_not_implement(tmp_path):
    from trl import DPOConfig

    from vlmfast.integrations.trl import CWDPOTrainer

    model, tok = _model_and_tokenizer()
    with pytest.raises(ValueError, match="tau_c must be > 0"):
        _trainer(CWDPOTrainer, model, tok, tmp_path, tau_c=0)
    args = DPOConfig(output_dir=str(tmp_path / "x"), loss_type=["ipo"], report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="unsupported: loss_type"):
        CWDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_data(),
                     processing_class=tok)
