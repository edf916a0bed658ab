"""The training stages: one module per stage type (sft, opd, grpo, preference: DPO and CW-DPO) over the shared
context (context.py). The trainer looks a step up by the stage's type in STEP_FUNCTIONS."""

from .context import (  # noqa: F401 (names the trainer, the plan and the tests use)
    StageContext,
    _counted,
    _device,
    _policy_loss,
    _row_slices,
    _rows,
    _sample,
    _sample_subset,
    _target,
    _target_ids,
    batch_examples,
    even_row_slices,
    example_rngs,
    forward_rows,
    mean_over_ranks,
    micro_batches_per_step,
    needs_reference,
    position_seeds,
    rank_positions,
    rank_share_of_tokens,
    rows_per_rank,
    sequences_per_rank,
    step_seed,
    update_rows,
    world,
)
from .grpo import (  # noqa: F401
    _TOKEN_MEAN_METRICS,
    _grpo_metrics,
    grpo_step,
    restore_rollout,
    rollout_state,
)
from .opd import opd_step
from .preference import auto_l_floor, dpo_step  # noqa: F401
from .sft import sft_step

STEP_FUNCTIONS = {"sft": sft_step, "opd": opd_step, "grpo": grpo_step, "dpo": dpo_step, "cw_dpo": dpo_step}
