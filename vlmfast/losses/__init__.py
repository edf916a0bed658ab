"""Losses for every stage, built on the fused token statistics (full logits never exist).

Each takes the policy's last hidden states [B, T, H] and lm_head weight [V, H], shifted labels
[B, T] (-100 on prompt and padding) and what the loss needs, and returns (loss, metrics) with
metrics a dict of detached scalar tensors. Each also exists as an nn.Module with its
hyperparameters in __init__.
"""

from .dpo import CWDPOLoss, DPOLoss, cw_dpo_loss, dpo_loss
from .grpo import GRPOLoss, group_advantages, grpo_loss
from .opd import OPDLoss, opd_loss
from .sft import SFTGentleNegativesLoss, SFTLoss, sft_gentle_negatives_loss, sft_loss

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
]
