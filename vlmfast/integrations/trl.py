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
after the prefix it shares with its completion (vlmfast.losses.sft), in one pass over the head.

`CWDPOTrainer` is TRL's DPOTrainer with the Cooling-Weighted DPO loss (vlmfast.losses.dpo):
-log sigmoid(beta (Dw - w_c Dl)), w_c = sigmoid((lbar_pi(yl) - l_floor) / tau_c) a stop-gradient weight per
pair, computed by `vlmfast.cw_dpo_loss` in the policy's forward (token_loss: one pass over the head wherever it
takes one, its gradients out of that forward), logged the TRL way (rewards/*, logps/*, entropy) plus
cooling_weight/mean and /frac_below_0.1.
"""

from __future__ import annotations

import functools

from ..losses._common import masked_mean
from ..models import call_head, head_token_stats, shared_images

IGNORE_INDEX = -100


def use_vlmfast_head(model, *, temperature: float = 1.0, backend: str = "auto"):
    """Make `model(..., labels=..., fused_lm_head=True)` compute TRL's FusedCausalLMOutput with vlmfast's op
    (patch in place after TRL's own `add_fused_lm_head`; also returns the model).

    With `vlmfast_loss=fn` as well, the forward returns fn(hidden, lm_head weight, labels, bias=...) instead: a
    vlmfast loss over the head (e.g. cw_dpo_loss with its other arguments bound), computed in one pass as the
    lm_head's own forward (ZeRO-3 gathers it) inside the model's forward (DDP and DeepSpeed see a loss made there).
    With `vlmfast_trunk=True` it returns the trunk's hidden states and the labels they score, [B, T - 1, H] and
    [B, T - 1], the head untouched: rows another call's vlmfast_loss takes (the gentle negatives)."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward

    @functools.wraps(previous)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, vlmfast_loss=None,
                vlmfast_trunk=False, **kwargs):
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
        if vlmfast_trunk:
            return hidden, labels
        if vlmfast_loss is not None:
            return call_head(model, hidden, lambda h, w, b=None: vlmfast_loss(h, w, labels, bias=b))
        mask = labels != IGNORE_INDEX

        stats = head_token_stats(model, hidden, labels, temperature=temperature, outputs=("logp", "entropy"),
                                 backend=backend)
        logp = stats.logp.masked_fill(~mask, 0)
        return FusedCausalLMOutput(loss=-masked_mean(logp, mask, num_items_in_batch), log_probs=logp,
                                   entropy=stats.entropy.masked_fill(~mask, 0), label_mask=mask)

    model.forward = forward
    return model


def _use_vlmfast_heads(trainer, **kwargs) -> None:
    """use_vlmfast_head on a trainer's policy (its base model under PEFT) and reference. The reference is patched
    inside the wrapper TRL prepared it in (DeepSpeed engine, FSDP, DDP): the wrapper's forward (ZeRO-3 hooks,
    unsharding, autocast) must still run before ours, as it does for TRL's own head, patched before wrapping."""
    policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    use_vlmfast_head(policy, **kwargs)
    ref = getattr(trainer, "ref_model", None)  # SFT has none
    if ref is not None:
        use_vlmfast_head(trainer.accelerator.unwrap_model(ref), **kwargs)


def _log_means(trainer, metrics: dict, names: dict) -> None:
    """Append metrics[name] under TRL's name for each (TRL name, name) of `names`: each process's mean, averaged over
    processes (TRL weights some by each process's tokens: the same when processes hold equal token counts)."""
    mode = "train" if trainer.model.training else "eval"
    for trl_name, name in names.items():
        value = metrics[name].reshape(1).to(trainer.accelerator.device)
        trainer._metrics[mode][trl_name].append(trainer.accelerator.gather_for_metrics(value).mean().item())


def _each(datasets, fn):
    """fn(dataset, key) over an eval_dataset: one dataset (key None), a dict of them, or None."""
    if datasets is None:
        return None
    if isinstance(datasets, dict):
        return {k: fn(v, k) for k, v in datasets.items()}
    return fn(datasets, None)


@functools.cache
def _grpo_trainer_class():
    from trl import GRPOTrainer

    class VLMFastGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer with the policy's (and reference's) per-token log-probs and entropy from
        vlmfast's fused op; everything else is TRL's."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _use_vlmfast_heads(self, temperature=self.temperature)

    return VLMFastGRPOTrainer


@functools.cache
def _cw_dpo_trainer_class():
    import torch
    from trl import DPOTrainer

    from ..losses import cw_dpo_loss
    from ..losses.dpo import check_l_floor

    class CWDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer with the Cooling-Weighted DPO loss. `tau_c` > 0; `l_floor` a number (e.g. the mean
        lbar of the negatives under the starting policy) or "batch" (the mean lbar of the batch's rejected).
        Takes the plain sigmoid DPO set-up (loss_type sigmoid, reverse KL, no length or WPO weighting). The
        reference's log-probs come first (precomputed, or its forward under no_grad, through vlmfast's head); then
        the policy's forward computes the loss in one pass (`use_vlmfast_head`'s vlmfast_loss)."""

        def __init__(self, *args, tau_c: float = 0.5, l_floor="batch", **kwargs):
            super().__init__(*args, **kwargs)
            if not (isinstance(tau_c, (int, float)) and tau_c > 0):
                raise ValueError(f"tau_c must be > 0, got {tau_c!r}")
            check_l_floor(l_floor)
            unsupported = {"loss_type": list(self.loss_types) != ["sigmoid"],
                           "f_divergence_type": self.f_divergence_type != "reverse_kl",
                           "ld_alpha": self.ld_alpha is not None, "use_weighting": self.use_weighting,
                           "aux loss (MoE)": self.aux_loss_enabled}
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(f"CWDPOTrainer implements the sigmoid DPO loss only; unsupported: {', '.join(bad)}")
            if self.ref_model is None and not self.precompute_ref_logps:
                raise ValueError("CWDPOTrainer needs a ref_model or precompute_ref_log_probs=True (a PEFT adapter "
                                 "as its own reference is not supported)")
            self.tau_c, self.l_floor = tau_c, l_floor
            _use_vlmfast_heads(self)

        def _compute_loss(self, model, inputs, return_outputs):
            model_kwargs = {k: v for k, v in inputs.items()
                            if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
            model_kwargs["use_cache"] = False
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                with torch.no_grad():
                    ref = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
                ref_chosen, ref_rejected = ref.chunk(2)  # the batch is [chosen, rejected]
            loss_fn = functools.partial(cw_dpo_loss, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                                        beta=self.beta, tau_c=self.tau_c, l_floor=self.l_floor)
            loss, metrics = model(**model_kwargs, labels=labels, fused_lm_head=True, vlmfast_loss=loss_fn)
            _log_means(self, metrics, {
                "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
                "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected", "entropy": "entropy",
                "cooling_weight/mean": "cooling_weight_mean",
                "cooling_weight/frac_below_0.1": "cooling_weight_frac_below_0_1"})
            if not return_outputs:
                return loss
            with torch.no_grad():  # logits for compute_metrics: another forward, as TRL's own DPOTrainer does
                return loss, model(**model_kwargs)

    return CWDPOTrainer


@functools.cache
def _gentle_sft_trainer_class():
    import torch
    from trl import SFTTrainer

    from ..losses.sft import _check_gentle, sft_gentle_negatives_loss

    def _check_columns(dataset, name):
        columns = getattr(dataset, "column_names", None) or []
        missing = [c for c in ("prompt", "completion", "negative") if c not in columns]
        if missing:
            raise ValueError(f"GentleSFTTrainer needs {name} columns prompt, completion and negative; "
                             f"missing: {', '.join(missing)}")

    class GentleSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with gentle negatives: `train_dataset` has prompt / completion / negative columns
        (text); the negative goes through TRL's own preparation as a completion of the same prompt. The negatives'
        trunk runs first; then the positives' forward computes `vlmfast.sft_gentle_negatives_loss` over the head
        for both (one pass each: the gradients come out of that forward)."""

        # the loss is this micro-batch's mean: the Trainer divides it by the accumulation steps (with None it would
        # count it as scaled, the model taking loss kwargs, and accumulate that many times the gradient)
        loss_is_scaled_for_ga = False

        def __init__(self, *args, train_dataset=None, eval_dataset=None, variant="hinge", lam=0.1, margin=3.0,
                     alpha=0.05, **kwargs):
            _check_gentle(variant=variant, lam=lam, margin=margin, alpha=alpha)
            config = kwargs.get("args", args[1] if len(args) > 1 else None)
            merged = [k for k in ("packing", "padding_free") if getattr(config, k, False)]
            if merged:  # the loss pairs each example's negative with it by row: one packed row would be one pair
                raise ValueError(f"GentleSFTTrainer pairs each example with its negative row by row; "
                                 f"{' and '.join(merged)} put several examples in one row: set them to False")
            _check_columns(train_dataset, "train_dataset")
            _each(eval_dataset, lambda d, k: _check_columns(d, "eval_dataset" if k is None else f"eval_dataset {k}"))
            super().__init__(*args, train_dataset=train_dataset.remove_columns("negative"),
                             eval_dataset=_each(eval_dataset, lambda d, k: d.remove_columns("negative")), **kwargs)
            if self._is_vision_dataset:
                raise ValueError("GentleSFTTrainer takes text datasets (TRL prepares image datasets in its collator)")
            self.train_dataset = self._with_negatives(self.train_dataset, train_dataset, "train")
            prepared = self.eval_dataset
            self.eval_dataset = _each(eval_dataset, lambda d, k: self._with_negatives(
                prepared if k is None else prepared[k], d, "eval" if k is None else f"eval-{k}"))
            self.gentle = {"variant": variant, "lam": lam, "margin": margin, "alpha": alpha}
            collate = self.data_collator

            def paired(examples):  # positives and negatives padded as TRL pads them, side by side
                pos = collate([{k: v for k, v in ex.items() if not k.startswith("negative_")} for ex in examples])
                neg = collate([{k.removeprefix("negative_"): v for k, v in ex.items() if k.startswith("negative_")}
                               for ex in examples])
                return {**pos, **{f"negative_{k}": v for k, v in neg.items()}}

            self.data_collator = paired
            _use_vlmfast_heads(self)

        def _with_negatives(self, prepared, raw, name):
            """TRL's prepared `raw` with its negatives beside it: each tokenised by TRL's own preparation as a
            completion of the same prompt (columns negative_input_ids, negative_labels)."""
            negatives = self._prepare_dataset(raw.remove_columns("completion").rename_column("negative", "completion"),
                                              self.processing_class, self.args, False, None, f"{name}-negatives")
            if len(negatives) != len(prepared):
                raise ValueError(f"GentleSFTTrainer: TRL's preparation kept {len(prepared)} {name} examples but "
                                 f"{len(negatives)} negatives (truncation drops rows): raise max_length")
            for col in ("input_ids", "labels"):
                prepared = prepared.add_column(f"negative_{col}", negatives[col])
            return prepared

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "negative_input_ids", "negative_labels"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            neg = {k.removeprefix("negative_"): inputs.pop(k) for k in list(inputs) if k.startswith("negative_")}
            neg_hidden, neg_labels = model(**neg, use_cache=False, fused_lm_head=True, vlmfast_trunk=True)

            def loss_fn(h, w, labels, bias=None):  # the positives' rows and the negatives' through one head
                return sft_gentle_negatives_loss(h, w, labels, neg_hidden, neg_labels, bias=bias, **self.gentle)

            loss, m = model(**inputs, use_cache=False, fused_lm_head=True, vlmfast_loss=loss_fn)
            logged = ("nll_pos", "nll_neg") + (("hinge_active",) if self.gentle["variant"] == "hinge" else ())
            _log_means(self, m, {name: name for name in logged})
            if not return_outputs:
                return loss
            with torch.no_grad():  # logits for compute_metrics: another forward (no labels: no loss over them)
                return loss, model(**{k: v for k, v in inputs.items() if k != "labels"})

    return GentleSFTTrainer


_TRAINERS = {"VLMFastGRPOTrainer": _grpo_trainer_class, "CWDPOTrainer": _cw_dpo_trainer_class,
             "GentleSFTTrainer": _gentle_sft_trainer_class}


def __getattr__(name):  # the trainer classes need TRL: built on first use
    if name in _TRAINERS:
        return _TRAINERS[name]()
    raise AttributeError(name)
