"""vlmfast's fused head in a transformers model, in one line:

    from vlmfast.integrations.transformers import apply_vlmfast
    apply_vlmfast(model)                      # a loaded Qwen2 / Qwen2.5 / Qwen3 or Qwen2-VL / 2.5-VL / 3-VL causal LM
    loss = model(**batch, labels=labels).loss # HF's loss (unshifted labels, -100 ignored), logits=None

With labels, `model(...)` returns HF's own causal-LM loss — labels unshifted as HF takes them, `ignore_index`
-100, `num_items_in_batch` (sum / count, for gradient accumulation) or `shift_labels` as HF's loss takes
them — computed by the fused lm_head op: the [B, T, V] logits are never materialised, and `logits` is None.
The model's own forward runs unchanged with its head returning the hidden states, so every model-specific
input (images, rope deltas, cache) is handled by the model itself. Without labels, and in `generate`, the
model behaves exactly as before. Under ZeRO-3 the head's weight is reached through the head module's own
forward (DeepSpeed gathers it), never read directly.

`return_token_stats=True` also puts per-token `token_logp` and `token_entropy` [B, T] (aligned with the
shifted labels, 0 where ignored) on the output, from the same fused pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..models import call_head, head_token_stats
from ..zero import forward_as

# model_type -> where the trunk's last hidden states go through the head (every entry: `lm_head`)
SUPPORTED = ("qwen2", "qwen2_5_vl", "qwen2_vl", "qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe", "llama")
IGNORE_INDEX = -100


def apply_vlmfast(model, *, return_token_stats: bool = False, backend: str = "auto"):
    """Patch `model` (in place; also returned) so that a forward with labels computes HF's causal-LM loss with
    the fused op. Raises ValueError for a model without an `lm_head` or of an unsupported type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"apply_vlmfast: model_type {model_type!r} ({type(model).__name__}) is not supported; "
                         f"supported: {', '.join(SUPPORTED)}")
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise ValueError(f"apply_vlmfast: {type(model).__name__} has no nn.Linear lm_head to fuse")
    if getattr(model, "_vlmfast_original_forward", None) is not None:
        return model  # already patched
    original = model.forward

    @functools.wraps(original)
    def forward(*args, labels=None, num_items_in_batch=None, shift_labels=None, **kwargs):
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        if kwargs.get("logits_to_keep", 0) not in (0, None):
            raise ValueError("apply_vlmfast: logits_to_keep with labels is not supported (the loss needs every "
                             "position)")
        # return_dict=False (HF's tuple): computed as a ModelOutput, handed back as HF's tuple (loss first)
        as_tuple = kwargs.pop("return_dict", None) is False
        with forward_as(model.lm_head, lambda h: h):  # the head hands the hidden states through
            out = original(*args, return_dict=True, **kwargs)
        hidden = out.logits  # [B, T, H]
        if shift_labels is None:  # HF: labels[t] is token t; position t predicts labels[t + 1]
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        out["loss"], stats = _fused_loss(model, hidden, shift_labels.to(hidden.device), num_items_in_batch,
                                         return_token_stats, backend)
        out["logits"] = None
        if stats is not None:
            out["token_logp"], out["token_entropy"] = stats
        if as_tuple:  # HF's order: the loss first, then the output's other fields that are set
            return tuple(v for v in (out["loss"], *(out[k] for k in out.keys() if k != "loss")) if v is not None)
        return out

    model._vlmfast_original_forward = original
    model.forward = forward
    return model


def remove_vlmfast(model):
    """Undo apply_vlmfast."""
    if getattr(model, "_vlmfast_original_forward", None) is not None:
        del model.forward
        model._vlmfast_original_forward = None
    return model


def _fused_loss(model, hidden, labels, num_items_in_batch, return_token_stats: bool, backend: str):
    """HF's loss: sum of token NLLs over labelled tokens / (num_items_in_batch, or their count)."""
    from ..losses import sft_loss
    from ..losses._common import masked_mean

    if not return_token_stats:
        return call_head(model, hidden, lambda h, w, b=None: sft_loss(
            h, w, labels, bias=b, num_items_in_batch=num_items_in_batch, backend=backend)[0]), None
    r = head_token_stats(model, hidden, labels, outputs=("logp", "entropy"), backend=backend)
    loss = -masked_mean(r.logp, labels != IGNORE_INDEX, num_items_in_batch)
    return loss, (r.logp.detach(), r.entropy.detach())
