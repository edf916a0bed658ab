"""Masked vocabulary: a logit of -inf (a bias that masks tokens) is raised to LOGIT_FLOOR after the temperature
scaling, in every backend (the native kernels' kLogitFloor, the Triton kernels' LOGIT_FLOOR, here for the PyTorch
ones). e^(floor - max) is exactly 0, so a masked column adds nothing to any sum, and the products with it (p z,
p log p, their gradients) are 0 instead of 0 x -inf = NaN: the statistics and gradients are those of the head
without the masked columns."""

import torch

LOGIT_FLOOR = -1e30


def floor_logits_(z: torch.Tensor) -> torch.Tensor:
    """z with every value below LOGIT_FLOOR (-inf) raised to it, in place."""
    return z.clamp_(min=LOGIT_FLOOR)
