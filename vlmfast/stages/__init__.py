"""The training stages: one module per stage type (sft, opd, grpo, preference: DPO and CW-DPO), each with its step
and its Stage (base.py: what it needs, its rows, its recipe checks, its state), over the shared context
(context.py). STAGES maps every recipe `type` to its Stage; the trainer, the recipe checks and the plan go through it.
"""

from . import grpo, opd, preference, sft
from .base import Stage
from .context import (  # noqa: F401 (names the trainer, the plan and the tests use)
    StageContext,
    _counted,
    _device,
    _policy_loss,
    _sample,
    _sample_subset,
    _target,
    _target_ids,
    batch_examples,
    even_row_slices,
    example_rngs,
    mean_over_ranks,
    position_seeds,
    rank_positions,
    rank_share_of_tokens,
    step_seed,
    token_budget_slices,
    world,
)
from .grpo import _TOKEN_MEAN_METRICS, _grpo_update, update_micro_slices, update_rows  # noqa: F401

STAGES: dict[str, Stage] = {t: kind.STAGE for kind in (sft, opd, grpo, preference) for t in kind.STAGE.types}


def stage_of(s) -> Stage:
    """The Stage that runs recipe stage `s` (its `type`)."""
    return STAGES[s.type]

