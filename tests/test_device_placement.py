"""Where the trainer's tensors live, checked on a machine with one device. On a GPU the policy's weights sit on the
GPU and every batch is collated on the host: a batch that reaches the model or a loss without being moved crashes
the first step ("Expected all tensors to be on the same device"), which a CPU run never shows.

Here "on the device" is a tag: a tensor subclass that only the trainer's move (collate.to_device) makes and that
torch ops carry to their results, as ops on GPU tensors give GPU tensors. Every stage type, the reference and
teacher passes, evaluation and the probes run one step; every tensor handed to the model's forward and to a loss
(labels, old / reference / sampler / teacher log-probs, advantages) must carry the tag."""

import pytest
import torch

pytestmark = pytest.mark.slow


class OnDevice(torch.Tensor):
    """A tensor the trainer moved to the model's device (torch's default __torch_function__ keeps the subclass on
    every result)."""


def _tag(x):
    return x.as_subclass(OnDevice) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x


def _moved(batch, device):
    return _tag(batch) if isinstance(batch, torch.Tensor) else {k: _tag(v) for k, v in batch.items()}


def _host_tensors(args: dict) -> list[str]:
    """The names of tensors that never moved: not tagged, not a parameter (the model's own), not a 0-dim scalar
    (torch combines a host scalar with device tensors)."""
    return [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.dim() > 0
            and not isinstance(v, (OnDevice, torch.nn.Parameter))]


@pytest.fixture
def placement(monkeypatch):
    """Tags what the trainer moves; records every model forward and loss call that received a host tensor."""
    from vlmfast import models, probes
    from vlmfast.ops import _inputs
    from vlmfast.rollout import hf
    from vlmfast.stages import context, grpo, opd, preference, sft

    for module in (context, probes, hf):
        monkeypatch.setattr(module, "to_device", _moved)
    bad, seen = [], []

    real_shared = models.shared_images

    def shared_images(model, batch):  # every trunk forward and HF generation passes here with its inputs
        seen.append("model")
        bad.extend(f"model input {k}" for k in _host_tensors(batch))
        return real_shared(model, batch)

    monkeypatch.setattr(models, "shared_images", shared_images)
    monkeypatch.setattr(hf, "shared_images", shared_images)
    # the teacher's head weight, copied out of its (device) parameters, lives with them
    monkeypatch.setattr(opd, "frozen_head_weight", lambda model: _tag(models.frozen_head_weight(model)))

    def checked(name, fn):
        def wrapper(*args, **kwargs):
            seen.append(name)
            named = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
            for k, v in list(named.items()):
                if isinstance(v, tuple):  # a teacher (hidden, weight)
                    named.update({f"{k}[{j}]": x for j, x in enumerate(v)})
            bad.extend(f"{name} {k}" for k in _host_tensors(named))
            return fn(*args, **kwargs)
        return wrapper

    for module, names in ((sft, ("sft_loss", "sft_gentle_negatives_loss")), (opd, ("opd_loss",)),
                          (preference, ("dpo_loss", "cw_dpo_loss")), (grpo, ("grpo_loss",))):
        for name in names:
            monkeypatch.setattr(module, name, checked(name, getattr(module, name)))
    # the fused op's own entry: hidden, target and a teacher's hidden (token_stats and token_loss alike)
    import vlmfast.ops as ops

    monkeypatch.setattr(ops, "check_token_stats", checked("token_stats", _inputs.check_token_stats))
    return bad, seen


STAGES = [
    {"type": "sft", "name": "sft", "steps": 1, "lr": 1e-3, "batch_size": 4},
    {"type": "sft", "name": "gentle", "steps": 1, "lr": 1e-3, "batch_size": 4,
     "gentle": {"variant": "hinge", "lam": 0.5, "margin": 8.0}},
    {"type": "opd", "name": "opd", "steps": 1, "lr": 1e-3, "batch_size": 4, "teacher": "tiny:teacher",
     "max_new_tokens": 4},
    {"type": "opd", "name": "opd_sampled", "steps": 1, "lr": 1e-3, "batch_size": 4, "teacher": "tiny:teacher",
     "max_new_tokens": 4, "opd_mode": "sampled"},
    {"type": "dpo", "name": "dpo", "steps": 1, "lr": 1e-3, "batch_size": 4, "max_new_tokens": 4},
    {"type": "cw_dpo", "name": "cwdpo", "steps": 1, "lr": 1e-3, "batch_size": 4, "max_new_tokens": 4},
    # two updates per rollout (pi_old's pass), a KL to the reference in the loss and in the reward
    {"type": "grpo", "name": "grpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "group_size": 2, "max_new_tokens": 4,
     "updates_per_rollout": 2, "kl_coef": 0.05, "kl_in_reward": True},
]


def test_every_tensor_reaching_the_model_or_a_loss_was_moved_to_its_device(tmp_path, placement):
    from vlmfast.config import load_config
    from vlmfast.train import run

    bad, seen = placement
    raw = {"run": {"name": "d", "out_dir": str(tmp_path), "threads": 2, "checkpoint_every": 100},
           "model": {"path": "tiny:student"}, "data": {"synthetic": {"train": 16, "val": 2, "ood": 2}},
           "eval": {"every": 100, "num_problems": 2, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 2},
           "stages": STAGES}
    run(load_config(raw=raw))
    for name in ("model", "token_stats", "sft_loss", "sft_gentle_negatives_loss", "opd_loss", "dpo_loss",
                 "cw_dpo_loss", "grpo_loss"):
        assert name in seen, name  # each boundary was crossed, so its check ran
    assert not bad, sorted(set(bad))
