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

`GentleSFTTrainer` is TRL's SFTTrainer with gentle negatives (vlmfast.losses.sft): a `negative` column beside
`prompt` / `completion`, tokenised by TRL's own preparation, and vlmfast's loss: NLL(y+) + lam mean_i
relu(margin - NLL_i(y-)) ("hinge") or NLL(y+) + alpha NLL(y-) ("extend"), each negative's NLL over its tokens
after the prefix it shares with its completion (vlmfast.losses.sft).

`CWDPOTrainer` is TRL's DPOTrainer with the Cooling-Weighted DPO loss (vlmfast.losses.dpo):
-log sigmoid(beta (Dw - w_c Dl)), w_c = sigmoid((lbar_pi(yl) - l_floor) / tau_c) a stop-gradient weight per
pair, logged the TRL way (rewards/*, logps/*, entropy) plus cooling_weight/mean and /frac_below_0.1.
"""

from __future__ import annotations

import functools

from ..losses._common import masked_mean
from ..models import head_token_stats, shared_images

IGNORE_INDEX = -100


def use_vlmfast_head(model, *, temperature: float = 1.0, backend: str = "auto"):
    """Make `model(..., labels=..., fused_lm_head=True)` compute TRL's FusedCausalLMOutput with vlmfast's op
    (patch in place after TRL's own `add_fused_lm_head`; also returns the model)."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward

    @functools.wraps(previous)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:  # TRL's forward (or the model's own, when TRL has not patched it)
            given = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **{k: v for k, v in given.items() if v is not None}, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **shared_images(model, kwargs)).last_hidden_state
        if shift_labels is None:  # position t scores label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        labels = labels.to(hidden.device)
        mask = labels != IGNORE_INDEX

        stats = head_token_stats(model, hidden, labels, temperature=temperature, outputs=("logp", "entropy"),
                                 backend=backend)
        logp = stats.logp.masked_fill(~mask, 0)
        return FusedCausalLMOutput(loss=-masked_mean(logp, mask, num_items_in_batch), log_probs=logp,
                                   entropy=stats.entropy.masked_fill(~mask, 0), label_mask=mask)

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


@functools.cache
def _cw_dpo_trainer_class():
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer

    from ..ops import cooling_weight

    class CWDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer with the Cooling-Weighted DPO loss. `tau_c` > 0; `l_floor` a number (e.g. the mean
        lbar of the negatives under the starting policy) or "batch" (the mean lbar of the batch's rejected).
        Takes the plain sigmoid DPO set-up (loss_type sigmoid, reverse KL, no length or WPO weighting)."""

        def __init__(self, *args, tau_c: float = 0.5, l_floor="batch", **kwargs):
            super().__init__(*args, **kwargs)
            if not (isinstance(tau_c, (int, float)) and tau_c > 0):
                raise ValueError(f"tau_c must be > 0, got {tau_c!r}")
            if l_floor != "batch" and not isinstance(l_floor, (int, float)):
                raise ValueError(f'l_floor must be a number or "batch", got {l_floor!r}')
            unsupported = {"loss_type": list(self.loss_types) != ["sigmoid"],
                           "f_divergence_type": self.f_divergence_type != "reverse_kl",
                           "ld_alpha": self.ld_alpha is not None, "use_weighting": self.use_weighting,
                           "aux loss (MoE)": self.aux_loss_enabled}
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(f"CWDPOTrainer implements the sigmoid DPO loss only; unsupported: {', '.join(bad)}")
            self.tau_c, self.l_floor = tau_c, l_floor

        def _sequence_logps(self, model, model_kwargs, labels, seq_len):
            out = model(**model_kwargs, labels=labels, fused_lm_head=True)
            return out, out.log_probs[:, -seq_len:].sum(1)

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            model_kwargs = {k: v for k, v in inputs.items()
                            if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
            model_kwargs["use_cache"] = False
            completion_mask = inputs["completion_mask"]
            mask = completion_mask[..., 1:]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs, logps = self._sequence_logps(model, model_kwargs, labels, mask.size(1))
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                with torch.no_grad():
                    ref_chosen, ref_rejected = self._sequence_logps(self.ref_model, model_kwargs, labels,
                                                                    mask.size(1))[1].chunk(2)
            chosen, rejected = logps.chunk(2)  # the batch is [chosen, rejected]
            d_w, d_l = chosen - ref_chosen, rejected - ref_rejected
            lbar_l = (rejected / mask.chunk(2)[1].sum(1).clamp(min=1)).detach()
            floor = lbar_l.mean() if self.l_floor == "batch" else float(self.l_floor)
            w_c = cooling_weight(lbar_l, floor, self.tau_c)
            loss = -F.logsigmoid(self.beta * (d_w - w_c * d_l)).mean()

            gather = self.accelerator.gather_for_metrics
            m = self._metrics[mode]
            r_c, r_l = self.beta * d_w.detach(), self.beta * d_l.detach()
            m["rewards/chosen"].append(gather(r_c).mean().item())
            m["rewards/rejected"].append(gather(r_l).mean().item())
            m["rewards/accuracies"].append(gather((r_c > r_l).float()).mean().item())
            m["rewards/margins"].append(gather(r_c - r_l).mean().item())
            m["logps/chosen"].append(gather(chosen.detach()).mean().item())
            m["logps/rejected"].append(gather(rejected.detach()).mean().item())
            entropy = outputs.entropy[:, -mask.size(1):].detach()
            m["entropy"].append((gather((entropy * mask).sum()).sum() / gather(mask.sum()).sum().clamp(min=1)).item())
            m["cooling_weight/mean"].append(gather(w_c).mean().item())
            m["cooling_weight/frac_below_0.1"].append(gather((w_c < 0.1).float()).mean().item())
            return (loss, outputs) if return_outputs else loss

    return CWDPOTrainer


@functools.cache
def _gentle_sft_trainer_class():
    from trl import SFTTrainer

    from ..losses.sft import _check_gentle, divergent_tokens, gentle_penalty

    class GentleSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with gentle negatives: `train_dataset` has prompt / completion / negative columns
        (text); the negative goes through TRL's own preparation as a completion of the same prompt."""

        def __init__(self, *args, train_dataset=None, variant="hinge", lam=0.1, margin=3.0, alpha=0.05, **kwargs):
            _check_gentle(variant=variant, lam=lam, margin=margin, alpha=alpha)
            columns = getattr(train_dataset, "column_names", None) or []
            missing = [c for c in ("prompt", "completion", "negative") if c not in columns]
            if missing:
                raise ValueError(f"GentleSFTTrainer needs train_dataset columns prompt, completion and negative; "
                                 f"missing: {', '.join(missing)}")
            super().__init__(*args, train_dataset=train_dataset.remove_columns("negative"), **kwargs)
            if self._is_vision_dataset:
                raise ValueError("GentleSFTTrainer takes text datasets (TRL prepares image datasets in its collator)")
            negatives = self._prepare_dataset(train_dataset.remove_columns("completion").rename_column(
                "negative", "completion"), self.processing_class, self.args, False, None, "train-negatives")
            for col in ("input_ids", "labels"):
                self.train_dataset = self.train_dataset.add_column(f"negative_{col}", negatives[col])
            self.gentle = {"variant": variant, "lam": lam, "margin": margin, "alpha": alpha}
            collate = self.data_collator

            def paired(examples):  # positives and negatives padded as TRL pads them, side by side
                pos = collate([{k: v for k, v in ex.items() if not k.startswith("negative_")} for ex in examples])
                neg = collate([{k.removeprefix("negative_"): v for k, v in ex.items() if k.startswith("negative_")}
                               for ex in examples])
                return {**pos, **{f"negative_{k}": v for k, v in neg.items()}}

            self.data_collator = paired

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "negative_input_ids", "negative_labels"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            neg = {k.removeprefix("negative_"): inputs.pop(k) for k in list(inputs) if k.startswith("negative_")}

            # the negatives' own tokens: after the prefix each shares with its positive (out.log_probs score
            # labels[:, 1:])
            own = divergent_tokens(inputs["labels"][:, 1:], neg["labels"][:, 1:]).to(self.accelerator.device)
            out = model(**inputs, use_cache=False, fused_lm_head=True)
            nll_pos = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
            neg_out = model(**neg, use_cache=False, fused_lm_head=True)
            penalty, m = gentle_penalty(neg_out.log_probs, own, **self.gentle)
            loss, nll_neg = nll_pos + penalty, m["nll_neg"]
            if self.gentle["variant"] == "hinge":
                self._metrics[mode]["hinge_active"].append(m["hinge_active"].item())
            gather = self.accelerator.gather_for_metrics
            self._metrics[mode]["nll_pos"].append(gather(nll_pos.detach()).mean().item())
            self._metrics[mode]["nll_neg"].append(gather(nll_neg.detach()).mean().item())
            return (loss, out) if return_outputs else loss

    return GentleSFTTrainer


_TRAINERS = {"VLMFastGRPOTrainer": _grpo_trainer_class, "CWDPOTrainer": _cw_dpo_trainer_class,
             "GentleSFTTrainer": _gentle_sft_trainer_class}


def __getattr__(name):  # the trainer classes need TRL: built on first use
    if name in _TRAINERS:
        return _TRAINERS[name]()
    raise AttributeError(name)
