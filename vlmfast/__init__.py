"""vlmfast: fast, instrumented post-training for vision-language models."""

from .losses import (
    CWDPOLoss,
    DPOLoss,
    GRPOLoss,
    OPDLoss,
    SFTGentleNegativesLoss,
    SFTLoss,
    cw_dpo_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    opd_loss,
    sft_gentle_negatives_loss,
    sft_loss,
)
from .losses.dpo import cooling_weight
from .ops import Teacher, TokenStats, sequence_mean, token_loss, token_stats, token_stats_from_logits

__version__ = "0.1.0"

# The torch APIs whose age sets setup.py's torch floor (the oldest release that has every one), with the
# aten overload each resolves to: docs/platform.md, "torch floor".
TORCH_APIS = {
    "torch.addmm(..., out_dtype=torch.float32, out=dw): dW accumulated in place (kernels/token_stats.py)":
        ("2.10", "addmm.dtype_out"),
    "torch.mm(..., out_dtype=torch.float32): fp32 results of 16-bit GEMMs (ops/_matmul.py)": ("2.8", "mm.dtype"),
}

__all__ = [
    "CWDPOLoss",
    "DPOLoss",
    "GRPOLoss",
    "OPDLoss",
    "SFTGentleNegativesLoss",
    "SFTLoss",
    "cw_dpo_loss",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "opd_loss",
    "sft_gentle_negatives_loss",
    "sft_loss",
    "Teacher",
    "TokenStats",
    "cooling_weight",
    "sequence_mean",
    "token_stats",
    "token_loss",
    "token_stats_from_logits",
]
