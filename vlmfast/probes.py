"""Instruments of the policy: token entropy on its own samples, Δlog p probes, early stopping.

- Entropy: mean full-vocabulary entropy over the response tokens of the policy's own samples, and
  over the answer tokens only (inside \\boxed{}: template tokens dominate the mean otherwise).
- Δlog p probes: on a fixed held-out set of (x, y+, y-) and the greedy response y*, the mean token
  log-prob lbar_t(y) - lbar_0(y) for each kind, every K steps. Squeezing shows as y+ and y- falling
  while y* rises.
- Early stopping: on a validation metric with patience, or at the peak of Δlog p(y+).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data.collate import collate, collate_token_responses, to_device
from .models import head_token_stats, trunk_hidden
from .ops import sequence_mean
from .rewards import boxed_token_indices


@torch.no_grad()
def mean_logprobs(model, processor, problems, images, responses, *, batch_size: int = 32) -> list[float]:
    """lbar(y): mean token log-prob of each response text (closing <|im_end|> included)."""
    out = []
    for i in range(0, len(problems), batch_size):
        sl = slice(i, i + batch_size)
        b = to_device(collate(processor, problems[sl], images[sl], responses[sl]), next(model.parameters()).device)
        hidden = trunk_hidden(model, **b)
        r = head_token_stats(model, hidden, b["labels"], outputs=("logp",), per_sequence=True)
        out += sequence_mean(r.seq_logp, r.seq_count).tolist()
    return out


def _answer_mask(processor, response_ids: list[list[int]], T: int, prompt_lengths) -> torch.Tensor:
    """[B, T] mask of the label positions predicting tokens inside the last \\boxed{...}."""
    mask = torch.zeros(len(response_ids), T, dtype=torch.bool)
    for b, ids in enumerate(response_ids):
        for j in boxed_token_indices(processor.tokenizer, ids):
            mask[b, int(prompt_lengths[b]) - 1 + j] = True
    return mask


@torch.no_grad()
def sample_entropy_sums(model, processor, problems, images, completions, *, keep: list[bool] | None = None,
                        batch_size: int = 32) -> torch.Tensor:
    """[entropy sum, response tokens, answer-token entropy sum, answer tokens] over the completions with
    `keep` set (default all; every one runs the forward: ranks under ZeRO-3 run as many forwards)."""
    sums = torch.zeros(4, dtype=torch.float64)
    for i in range(0, len(problems), batch_size):
        sl = slice(i, i + batch_size)
        ids = [c.token_ids for c in completions[sl]]
        b = collate_token_responses(processor, problems[sl], images[sl], ids)
        ans = _answer_mask(processor, ids, b["labels"].shape[1], b["prompt_lengths"])  # read on the host
        b = to_device(b, next(model.parameters()).device)
        hidden = trunk_hidden(model, **b)
        r = head_token_stats(model, hidden, b["labels"], outputs=("entropy",))
        valid = b["labels"] != -100
        if keep is not None:
            valid &= torch.tensor(keep[sl], device=valid.device)[:, None]
        ans = ans.to(valid.device) & valid
        sums += torch.tensor([r.entropy[valid].sum().item(), valid.sum().item(), r.entropy[ans].sum().item(),
                              ans.sum().item()], dtype=torch.float64)
    return sums


def entropy_means(sums: torch.Tensor) -> dict:
    """{entropy, entropy_answer} from sample_entropy_sums (summed over ranks where sharded)."""
    ent, n_tok, ans, n_ans = sums.tolist()
    return {"entropy": ent / max(n_tok, 1), "entropy_answer": ans / n_ans if n_ans else float("nan")}


def sample_entropy(model, processor, problems, images, completions, *, batch_size: int = 32) -> dict:
    """Mean entropy over the response tokens of given completions (the policy's own samples), and
    over their answer tokens."""
    return entropy_means(sample_entropy_sums(model, processor, problems, images, completions, batch_size=batch_size))


PROBE_METRICS = tuple(f"{stat}_{kind}" for kind in ("pos", "neg", "greedy") for stat in ("lbar", "dlogp"))


@dataclass
class DeltaLogpProbe:
    """lbar_t(y) - lbar_0(y) for positives, negatives and the greedy response, on a fixed probe set.
    The first call records lbar_0; y* is the greedy response of the policy at each call."""

    problems: list[str]
    images: list[list]
    positives: list[str]
    negatives: list[str]
    baseline: dict = field(default_factory=dict)

    def __call__(self, model, processor, greedy_responses: list[str]) -> dict:
        now = {
            "pos": mean_logprobs(model, processor, self.problems, self.images, self.positives),
            "neg": mean_logprobs(model, processor, self.problems, self.images, self.negatives),
            "greedy": mean_logprobs(model, processor, self.problems, self.images, greedy_responses),
        }
        if not self.baseline:
            self.baseline = now
        out = {}
        for kind in ("pos", "neg", "greedy"):
            mean_now = sum(now[kind]) / len(now[kind])
            out[f"lbar_{kind}"] = mean_now
            out[f"dlogp_{kind}"] = mean_now - sum(self.baseline[kind]) / len(self.baseline[kind])
        return out


@dataclass
class EarlyStopping:
    """Stop when `metric` has not improved by min_delta for `patience` evaluations.
    mode "max" or "min"; for the Δlog p(y+) peak rule use metric="dlogp_pos", mode="max"."""

    metric: str
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"early stopping mode must be 'max' or 'min', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def update(self, step: int, metrics: dict) -> tuple[bool, bool]:
        """Returns (is_best, should_stop)."""
        if self.metric not in metrics:
            raise KeyError(f"early-stopping metric {self.metric!r} not among {sorted(metrics)}")
        v = metrics[self.metric]
        better = self.best is None or (v > self.best + self.min_delta if self.mode == "max"
                                       else v < self.best - self.min_delta)
        if better:
            self.best, self.best_step, self.bad = v, step, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
