"""The stage protocol: what a stage type brings to the trainer (train.py, stage_loop.py), the recipe checks
(config.py) and the memory plan (plan.py), each of which iterates over it and never asks a stage's type.

One subclass per stage module (sft.py, opd.py, grpo.py, preference.py), registered by the recipe `type`s it runs in
`vlmfast.stages.STAGES`. Adding a stage type, or an option of one, touches that stage's module and its test: the
defaults here are what a stage without the feature does.
"""

from __future__ import annotations


class Stage:
    types: tuple[str, ...] = ()  # the recipe `type` values this class runs
    samples_in_training = True  # draws rollouts from the policy during training (the plan's rollout phase)
    trains_without_dropout = False  # the policy's training forwards run with every dropout at p = 0
    # recipe keys only this class's types read: {key: what they set}; another type given one (other than its default)
    # is a config error, not a setting silently ignored
    own_keys: dict[str, str] = {}
    type_keys: dict[str, tuple[str, ...]] = {}  # own keys that only some of this class's types read: {key: types}

    # ---- one step -------------------------------------------------------------------------------------------
    @staticmethod
    def step(ctx, step: int):
        """(loss, metrics) for step `step`, or an iterator of micro-batches' (loss share, metrics): context.py."""
        raise NotImplementedError

    # ---- what the stage needs beside the policy -------------------------------------------------------------
    def needs_reference(self, s) -> bool:
        """Reads a frozen reference model's log-probs (pi_ref = the policy at stage start): loaded and planned."""
        return False

    def teacher(self, s) -> str | None:
        """The checkpoint of a frozen teacher the stage reads, or None."""
        return None

    def teacher_engine(self, s) -> bool:
        """The teacher also generates or scores through an engine of its own (a second vLLM when engine: vllm)."""
        return False

    # ---- rows and memory (the trainer's micro-batches, the plan's terms) --------------------------------------
    def rows_per_rank(self, s, world_size: int) -> int:
        """Rows of one step's batch on each rank."""
        return s.batch_size // world_size

    def sequences_per_row(self, s) -> int:
        """Sequences one row puts through the forward: 2 for a pair (chosen and rejected, target and negative)."""
        return 1

    def micro_batches(self, s, world_size: int) -> int:
        """Backward passes per step (the same on every rank: ZeRO-3 needs it): the rank's rows in micro-batches of
        at most micro_batch_size rows, as even as they go (20 rows at most 8 are 7, 7 and 6). With a token budget
        the count follows the sequences' lengths (decided per step, context.micro_slices): 1 here."""
        if not s.micro_batch_size:
            return 1
        return -(-self.rows_per_rank(s, world_size) // s.micro_batch_size)

    def forward_tokens(self, s, world_size: int, sequence_tokens: int) -> int:
        """Tokens one forward and backward holds on a rank at most (the plan's activations), each sequence at most
        `sequence_tokens` long: the largest micro-batch's sequences; under a token budget whole rows up to it (a
        longer row runs alone)."""
        rows = -(-self.rows_per_rank(s, world_size) // self.micro_batches(s, world_size))
        row_tokens = self.sequences_per_row(s) * sequence_tokens
        tokens = max(1, rows) * row_tokens
        if s.max_tokens_per_micro_batch:
            tokens = min(tokens, max(s.max_tokens_per_micro_batch, row_tokens))
        return tokens

    def grouped_loss(self, s) -> bool:
        """The loss reads whole sequences (token_loss with groups): the plan counts the one pass's buffers so."""
        return False

    def teacher_head_copy(self, s) -> bool:
        """The loss holds a copy of the teacher's head (the full-vocabulary KL)."""
        return False

    def prompts_per_step(self, s) -> int:
        """Training prompts one step draws (over all ranks)."""
        return s.batch_size

    def rollout_rows(self, s, world_size: int) -> int:
        """Sequences one rollout generates on each rank (the plan's generate buffers)."""
        return s.batch_size // world_size * 4

    # ---- the recipe ---------------------------------------------------------------------------------------------
    def check(self, s, key: str, bad) -> None:
        """This type's recipe keys (bad(key, message) raises ConfigError), its loss's hyperparameters through the
        loss's own check."""

    def whole_batch_loss(self, s) -> str | None:
        """Why the stage's loss must see the rank's whole batch in one forward (no micro-batches), or None."""
        return None

    # ---- the stage's own state: opened once, kept in checkpoints -----------------------------------------------
    def open(self, ctx, saved: dict | None) -> None:
        """Stage-start work once the policy, engines, reference and teacher exist; `saved` is state() of the
        checkpoint a resume reads (None on a fresh start)."""

    def state(self, ctx) -> dict:
        """What every rank agrees on and a resume needs (rank 0 writes it)."""
        return {}

    def rank_state(self, ctx):
        """What this rank alone holds and a resume needs (e.g. the rollout batch in progress), or None."""
        return None

    def restore_rank_state(self, ctx, saved) -> None:
        """Continue from rank_state()'s saved value."""


def check_micro_batching(stage: Stage, s, key: str, bad) -> None:
    """micro_batch_size / max_tokens_per_micro_batch, which every stage type reads (context.micro_slices)."""
    if s.max_tokens_per_micro_batch is not None:
        if s.micro_batch_size is not None:
            bad(f"{key}.max_tokens_per_micro_batch", "set it or micro_batch_size, not both")
        if s.max_tokens_per_micro_batch < 1:
            bad(f"{key}.max_tokens_per_micro_batch", f"must be >= 1, got {s.max_tokens_per_micro_batch}")
    if s.micro_batch_size is not None and s.micro_batch_size < 1:
        bad(f"{key}.micro_batch_size", f"must be >= 1 (rows per forward, at most), got {s.micro_batch_size}")
    why = stage.whole_batch_loss(s)
    if why and (s.micro_batch_size is not None or s.max_tokens_per_micro_batch is not None):
        name = "micro_batch_size" if s.micro_batch_size is not None else "max_tokens_per_micro_batch"
        bad(f"{key}.{name}", f"this stage runs its batch in one forward: {why}")


def check_loss(bad, key: str, check, **values) -> None:
    """Run a loss's own hyperparameter check (one rule, one place); its message names the parameter first, which
    becomes the recipe key: stages[1].clip_high, not the loss's wording alone."""
    try:
        check(**values)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        if name in values:
            bad(f"{key}.{name}", rest)
        else:
            bad(key, str(e))
