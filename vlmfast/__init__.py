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
from .ops import Teacher, TokenStats, cooling_weight, sequence_mean, token_loss, token_stats, token_stats_from_logits

__version__ = "0.1.0"

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
