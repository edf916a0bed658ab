"""vlmfast's fused head inside TRL's trainers (TRL >= 1.16).

TRL's GRPO, RLOO and KTO trainers score completions through a fused-head protocol: the trainer patches the
policy (`trl.trainer.utils.add_fused_lm_head`) and calls `model(..., labels=labels, fused_lm_head=True)`,
reading per-token `log_probs` and `entropy` (of the next-token label, [B, T - 1]) and `loss` from the output.
`use_vlmfast_head(model)` answers that protocol with vlmfast's op instead: the same fields, from the trunk's
hidden states and one fused pass over the vocabulary (`vlmfast.token_stats`, through the lm_head module's own
forward, so ZeRO-3 gathers it), each repeated image (a group's samples) through the vision tower once.

    from vlmfast.integrations.trl import VLMFastGRPOTrainer
    trainer = VLMFastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Anything else (generation, a forward without `fused_lm_head`) reaches the forward TRL left in place.
"""

from __future__ import annotations

import functools

from ..models import call_head, shared_images

IGNORE_INDEX = -100


def use_vlmfast_head(model, *, temperature: float = 1.0, backend: str = "auto"):
    """Make `model(..., labels=..., fused_lm_head=True)` compute TRL's FusedCausalLMOutput with vlmfast's op
    (patch in place after TRL's own `add_fused_lm_head`; also returns the model)."""
    from trl.trainer.utils import FusedCausalLMOutput

    from ..ops import token_stats

    previous = model.forward

    @functools.wraps(previous)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, fused_lm_head=False, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **shared_images(model, kwargs)).last_hidden_state
        if shift_labels is None:  # position t scores label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        labels = labels.to(hidden.device)
        mask = labels != IGNORE_INDEX

        def fn(h, w, b=None):  # a dict of tensors: DeepSpeed's hooks see every output
            return token_stats(h, w, labels, bias=b, temperature=temperature, outputs=("logp", "entropy"),
                               backend=backend).as_dict()

        stats = call_head(model, hidden, fn)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        logp = stats["logp"].masked_fill(~mask, 0)
        return FusedCausalLMOutput(loss=-logp.sum() / count, log_probs=logp,
                                   entropy=stats["entropy"].masked_fill(~mask, 0), label_mask=mask)

    model.forward = forward
    return model


@functools.cache
def _grpo_trainer_class():
    from trl import GRPOTrainer

    class VLMFastGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer with the policy's (and reference's) per-token log-probs and entropy from
        vlmfast's fused op; everything else is TRL's."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            use_vlmfast_head(policy, temperature=self.temperature)
            if self.ref_model is not None:
                use_vlmfast_head(self.ref_model, temperature=self.temperature)

    return VLMFastGRPOTrainer


def __getattr__(name):  # the trainer classes need TRL: built on first use
    if name == "VLMFastGRPOTrainer":
        return _grpo_trainer_class()
    raise AttributeError(name)
