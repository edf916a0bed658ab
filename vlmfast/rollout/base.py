"""The generation-engine interface shared by the HF and vLLM engines.

    generate(problems, images, n, sampling) -> [[Completion] * n] per prompt
    sync_weights(model)                       push the trainer's current weights into the engine
    score(problems, images, response_ids)     per-token log-probs of given responses

Log-probs are those of the distribution actually sampled from (temperature, top-k and top-p
applied), so the trainer can measure the sampler/trainer mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A sampled vision token would be read as an image slot with no image behind it: a completion ends
# before it (finish_reason "vision_token"). Suppressing them instead would change the distribution
# sampled from, and the sampler's log-probs would no longer be the policy's.
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def vision_token_ids(tokenizer) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in VISION_TOKENS if t in vocab}


def end_of_completion(ids: list[int], eos_id: int, vision_ids: set[int]) -> tuple[list[int], str]:
    """Cut generated ids after the first end of turn ("stop") or before the first vision token
    ("vision_token"); otherwise the budget ran out ("length")."""
    for j, t in enumerate(ids):
        if t == eos_id:
            return ids[: j + 1], "stop"
        if t in vision_ids:
            return ids[:j], "vision_token"
    return ids, "length"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # one per token: log-prob under the distribution sampled from
    finish_reason: str  # "stop" (end of turn generated), "length" or "vision_token" (cut before one)
    meta: dict = field(default_factory=dict)


def check_batch(problems, images, n):
    if len(problems) != len(images):
        raise ValueError(f"{len(problems)} prompts but {len(images)} image lists")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def mismatch(sampler_logprobs: list[list[float]], trainer_logprobs: list[list[float]]) -> float:
    """Mean |logp_sampler - logp_trainer| over all tokens: the sampler/trainer mismatch metric."""
    total, count = 0.0, 0
    for a, b in zip(sampler_logprobs, trainer_logprobs, strict=True):
        if len(a) != len(b):
            raise ValueError(f"log-prob lists differ in length: {len(a)} vs {len(b)}")
        total += sum(abs(x - y) for x, y in zip(a, b))
        count += len(a)
    return total / max(count, 1)
