"""The ops and losses under test and every provider of each: vlmfast's backends, the naive PyTorch
version (materialised logits, log_softmax + gather, full distributions), Liger-Kernel's fused
equivalents and PyTorch's own `linear_cross_entropy`. On a CPU, vlmfast's chunked backend runs
twice: with its PyTorch epilogue ("vlmfast-chunked") and with the native C++ one ("vlmfast-native").
Each provider maps the same inputs to a scalar loss, so a case is timed forward and
forward+backward identically for all.

Equivalence is checked, not assumed: `agreement()` compares each provider's loss and gradients with
the naive fp32 result before anything is timed (Liger's losses are configured to the same math:
GRPO with loss_type "dapo" = token mean, DPO without a reference model, JSD at the reverse-KL end).
"""

from __future__ import annotations

import functools
import os

from vlmfast.ops.native import keep_native_switch

OPS = ("sft", "token_stats", "sft_gentle", "opd", "grpo", "dpo", "cw_dpo")
SEQ_LEN = 256  # tokens per sequence: B = N / SEQ_LEN
PROMPT = 64  # prompt tokens per sequence (ignored by every loss)
# CW-DPO's l_floor as the trainer runs it (l_floor: auto, a number fixed at the stage's start: each pair's loss reads
# only its own sequences); about the mean log-prob of these random heads' tokens, so w_c is spread, not 0 or 1
L_FLOOR = -10.5


def counted_tokens(n: int) -> int:
    """Tokens of a case of nominal size n that a loss counts (build's shapes less the prompt): the
    FLOPs per second are of the work a trainer needs; a fused op that skips the prompt gains nothing."""
    B, T = max(2, n // SEQ_LEN), min(n, SEQ_LEN)
    B += B % 2
    return B * (T - min(PROMPT, T // 4))


def build(op: str, n: int, h: int, v: int, *, device="cpu", dtype=None, seed: int = 0) -> dict:
    """Inputs of one case: hidden [B, T, H], weight [V, H], labels [B, T] (-100 on the prompt), plus
    what the op needs (teacher head, old/ref log-probs, advantages, reference sequence log-probs)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    B, T = max(2, n // SEQ_LEN), min(n, SEQ_LEN)
    B += B % 2  # preference pairs

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = {"hidden": randn(B, T, h), "weight": randn(v, h, scale=h**-0.5)}
    labels = torch.randint(0, v, (B, T), generator=g)
    labels[:, : min(PROMPT, T // 4)] = -100
    x["labels"] = labels.to(device)
    if op == "opd":
        x["teacher"] = (randn(B, T, h), randn(v, h, scale=h**-0.5))
    if op == "grpo":
        x["old_logp"] = (-torch.rand(B, T, generator=g) * 2 - 10).to(device)
        x["advantages"] = torch.randn(B, generator=g).to(device)
    if op in ("dpo", "cw_dpo"):
        x["ref_c"] = torch.zeros(B // 2, device=device)  # no reference: Liger's use_ref_model=False
        x["ref_r"] = torch.zeros(B // 2, device=device)
    return x


# --- naive: what a trainer computes without a fused op -------------------------------------------

def naive(op: str, x: dict):
    """The naive reference of each loss (vlmfast/losses/reference.py, the one the tests use), with the
    hyperparameters vlmfast_loss passes: logits [B, T, V] by a GEMM in the inputs' dtype, upcast to fp32."""
    from vlmfast.losses import reference

    h, W, y = x["hidden"], x["weight"], x["labels"]
    if op == "sft":
        return reference.sft(h, W, y, dtype=None)
    if op == "token_stats":  # logp + entropy of every response token (what the probes read)
        return reference.logp_plus_entropy(h, W, y, dtype=None)
    if op == "sft_gentle":
        B = h.shape[0] // 2
        return reference.gentle(h[:B], W, y[:B], h[B:], y[B:], variant="hinge", lam=0.1, margin=50.0, alpha=0.0,
                                dtype=None)
    if op == "opd":
        return reference.opd_full(h, W, y, *x["teacher"], dtype=None)
    if op == "grpo":
        return reference.grpo(h, W, y, x["old_logp"], x["advantages"], clip_high=0.28, dtype=None)
    if op == "dpo":
        return reference.dpo(h, W, y, x["ref_c"], x["ref_r"], beta=0.1, dtype=None)
    return reference.dpo(h, W, y, x["ref_c"], x["ref_r"], beta=0.1, tau_c=0.5, l_floor=L_FLOOR, dtype=None)


# --- vlmfast --------------------------------------------------------------------------------------

def vlmfast_loss(op: str, x: dict, backend: str, native_epilogue: bool | None = None):
    """vlmfast's loss. On the CPU, `native_epilogue` picks the chunked backend's epilogue: the C++
    kernels (True) or PyTorch (False). vlmfast reads VLMFAST_NATIVE at forward and at backward, so
    the provider leaves it set: the next provider's call sets its own."""
    import vlmfast

    if native_epilogue is not None:
        os.environ["VLMFAST_NATIVE"] = "1" if native_epilogue else "0"

    h, W, y = x["hidden"], x["weight"], x["labels"]
    kw = dict(backend=backend)
    if op == "sft":
        return vlmfast.sft_loss(h, W, y, **kw)[0]
    if op == "token_stats":
        r = vlmfast.token_stats(h, W, y, outputs=("logp", "entropy"), backend=backend)
        mask = y != -100
        return ((r.logp + r.entropy) * mask).sum() / mask.sum()
    if op == "sft_gentle":
        B = h.shape[0] // 2
        return vlmfast.sft_gentle_negatives_loss(h[:B], W, y[:B], h[B:], y[B:], margin=50.0, **kw)[0]
    if op == "opd":
        return vlmfast.opd_loss(h, W, y, teacher=x["teacher"], **kw)[0]
    if op == "grpo":
        return vlmfast.grpo_loss(h, W, y, x["old_logp"], x["advantages"], clip_high=0.28, **kw)[0]
    if op == "dpo":
        return vlmfast.dpo_loss(h, W, y, x["ref_c"], x["ref_r"], beta=0.1, **kw)[0]
    return vlmfast.cw_dpo_loss(h, W, y, x["ref_c"], x["ref_r"], beta=0.1, tau_c=0.5, l_floor=L_FLOOR, **kw)[0]


# --- PyTorch's own fused linear cross entropy (plain CE only) ---------------------------------------

def torch_lce(op: str, x: dict):
    import torch.nn.functional as F

    h, W, y = x["hidden"], x["weight"], x["labels"]
    return F.linear_cross_entropy(h.flatten(0, 1), W, y.flatten(), ignore_index=-100)


# --- Liger-Kernel ------------------------------------------------------------------------------------

@functools.cache
def _liger_module(op: str, compiled: bool):
    if op == "sft":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    if op == "grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                        loss_type="dapo", compiled=compiled)
    if op == "dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        return LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=compiled)
    if op == "opd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # generalised JSD at beta = 1: KL(student || teacher), the reverse KL of OPD
        return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=compiled)
    raise KeyError(op)


def liger(op: str, x: dict):
    h, W, y = x["hidden"], x["weight"], x["labels"]
    compiled = h.device.type == "cuda"  # torch.compile of Liger's chunks: ~20 s per shape on a CPU
    m = _liger_module(op, compiled)
    if op == "sft":
        return m(W, h.flatten(0, 1), y.flatten())
    if op == "grpo":
        mask = (y != -100).long()
        out = m(h, W, y.clamp(min=0), mask, x["advantages"], old_per_token_logps=x["old_logp"])
        return out[0] if isinstance(out, tuple) else out
    if op == "dpo":
        out = m(W, h, y)
        return out[0] if isinstance(out, tuple) else out
    if op == "opd":
        th, tw = x["teacher"]
        return m(h.flatten(0, 1), W, th.flatten(0, 1), tw, y.flatten())
    raise KeyError(op)


LIGER_OPS = {"sft": "cuda", "grpo": "any", "dpo": "any", "opd": "any"}  # Liger's fused CE is Triton-only


def providers(op: str, device: str) -> dict:
    """{name: fn(x) -> loss} of the providers of `op` available on `device`."""
    out = {"naive": functools.partial(naive, op)}
    if device == "cuda":
        out["vlmfast-chunked"] = functools.partial(vlmfast_loss, op, backend="chunked")
        out["vlmfast-triton"] = functools.partial(vlmfast_loss, op, backend="triton")
    else:  # the chunked backend with its PyTorch epilogue, and with the native one when it is built
        out["vlmfast-chunked"] = functools.partial(vlmfast_loss, op, backend="chunked", native_epilogue=False)
        from vlmfast.ops import native

        if native.available():
            out["vlmfast-native"] = functools.partial(vlmfast_loss, op, backend="chunked", native_epilogue=True)
    if op == "sft":
        out["torch-lce"] = functools.partial(torch_lce, op)
    if op in LIGER_OPS and (LIGER_OPS[op] == "any" or device == "cuda"):
        try:
            import liger_kernel  # noqa: F401

            out["liger"] = functools.partial(liger, op)
        except ImportError:
            pass
    return out


def agreement(op: str, h: int, v: int, device: str = "cpu", n: int = 512, dtype=None) -> dict:
    """{provider: relative error vs naive} over the loss and both gradients, on a small case in `dtype`
    (fp32 by default; the GPU suite checks in the bf16 it times); a provider that raises gets its error
    message instead of a number."""
    import torch

    x = build(op, n, h, v, device=device, dtype=dtype)
    results = {}
    with keep_native_switch():
        for name, fn in providers(op, device).items():
            x2 = dict(x, hidden=x["hidden"].clone().requires_grad_(), weight=x["weight"].clone().requires_grad_())
            try:
                loss = fn(x2)
                results[name] = (loss.detach().float(), *(g.float() for g in torch.autograd.grad(
                    loss, (x2["hidden"], x2["weight"]))))
            except Exception as e:  # a provider that cannot run this op here: reported, not timed
                results[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    ref = results["naive"]
    out = {}
    for name, r in results.items():
        if isinstance(r, str):
            out[name] = r
        else:
            out[name] = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in zip(r, ref))
    return out
