"""Edges of the stages' arithmetic that a normal run does not reach: a step with no response token on any rank,
and CW-DPO's automatic floor measured as the loss measures (at the stage's temperature)."""

import pytest
import torch
import torch.nn.functional as F


def test_a_step_with_no_response_token_has_loss_zero_not_nan():
    from vlmfast.losses import sft_loss
    from vlmfast.stages import rank_share_of_tokens

    h = torch.randn(2, 5, 8, requires_grad=True)
    W = torch.randn(50, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)  # prompt-only rows: nothing counted anywhere
    n = rank_share_of_tokens(labels, "cpu")
    loss, _ = sft_loss(h, W, labels, num_items_in_batch=n)
    loss.backward()
    assert n.item() == 1.0 and loss.item() == 0.0
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cw_dpo_auto_floor_is_the_negatives_mean_log_prob_at_the_stage_temperature(monkeypatch, temperature):
    from vlmfast.config import load_config
    from vlmfast.data.loading import load_data
    from vlmfast.models import tiny_vlm
    from vlmfast.stages import StageContext, preference

    cfg = load_config(raw={"run": {"name": "f", "out_dir": "/tmp/unused"}, "model": {"path": "tiny:student"},
                           "data": {"synthetic": {"train": 20, "val": 2, "ood": 2}},
                           "stages": [{"type": "cw_dpo", "temperature": temperature}]})
    model, processor = tiny_vlm("student", seed=0)
    batches = []
    real = preference.collate
    monkeypatch.setattr(preference, "collate", lambda *a, **k: batches.append(real(*a, **k)) or batches[-1])
    ctx = StageContext(cfg=cfg, stage=cfg.stages[0], index=0, model=model, processor=processor,
                       train=load_data(cfg)["train"])
    floor = preference.auto_l_floor(ctx)
    # the naive formula: each negative's mean log-prob of its response tokens under softmax(logits / T)
    lbars = []
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k not in ("labels", "prompt_lengths", "response_lengths")}
            logits = model(**inputs).logits.double() / temperature
            labels = b["labels"]
            logp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            mask = labels != -100
            lbars += ((logp * mask).sum(1) / mask.sum(1)).tolist()
    assert len(lbars) == 20 and floor == pytest.approx(sum(lbars) / len(lbars), rel=1e-4)


def test_a_steps_peak_memory_is_its_own(monkeypatch):
    """On a GPU the peak is reset at each step's start and read at its end without a reset: an evaluation or a
    checkpoint between steps (vLLM awake, a gathered model) is not charged to the next step (torch.cuda stand-in)."""
    from vlmfast import stage_loop

    calls, reserved = [], [7 * 2**20]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: calls.append("read") or reserved[0])
    stage_loop._reset_peak_memory()
    assert stage_loop._peak_memory_mb() == 7.0 and calls == ["reset", "read"]  # read without a reset


@pytest.mark.slow
def test_preference_stages_train_without_dropout_and_others_keep_it(tmp_path, monkeypatch):
    """DPO's implicit reward compares the policy with a reference scored without dropout (TRL's DPOConfig
    disable_dropout, default True): every dropout (LoRA's at 0.5 here) is at p = 0 in DPO's training forwards and
    back at 0.5 for SFT's."""
    from vlmfast.config import load_config
    from vlmfast.stages import preference, sft
    from vlmfast.train import run

    seen = {}

    def spy(module, name, kind):
        real = getattr(module, name)

        def loss(h, w, *a, **k):
            ps = {m.p for m in seen["model"].modules() if isinstance(m, torch.nn.Dropout)}
            seen.setdefault(kind, set()).update(ps)
            return real(h, w, *a, **k)
        monkeypatch.setattr(module, name, loss)

    spy(sft, "sft_loss", "sft")
    spy(preference, "dpo_loss", "dpo")
    real_policy_loss = preference._policy_loss
    monkeypatch.setattr(preference, "_policy_loss", lambda ctx, *a: seen.update(model=ctx.model) or
                        real_policy_loss(ctx, *a))
    real_sft_policy_loss = sft._policy_loss
    monkeypatch.setattr(sft, "_policy_loss", lambda ctx, *a: seen.update(model=ctx.model) or
                        real_sft_policy_loss(ctx, *a))
    raw = {"run": {"name": "d", "out_dir": str(tmp_path), "threads": 2, "checkpoint_every": 100},
           "model": {"path": "tiny:student", "lora": {"r": 4, "dropout": 0.5}},
           "data": {"synthetic": {"train": 16, "val": 2, "ood": 2}},
           "eval": {"every": 100, "num_problems": 2, "n_samples": 1, "k": [1], "max_new_tokens": 4, "probes": 0,
                    "at_start": False},
           "stages": [{"type": "sft", "name": "sft", "steps": 1, "lr": 1e-3, "batch_size": 4},
                      {"type": "dpo", "name": "dpo", "steps": 1, "lr": 1e-3, "batch_size": 4, "max_new_tokens": 4}]}
    run(load_config(raw=raw))
    assert seen["sft"] == {0.5} and seen["dpo"] == {0.0}
