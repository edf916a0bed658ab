"""vlmfast: fast, instrumented post-training for vision-language models."""

from .ops import Teacher, TokenStats, cooling_weight, sequence_mean, token_stats, token_stats_from_logits

__version__ = "0.1.0"

__all__ = [
    "Teacher",
    "TokenStats",
    "cooling_weight",
    "sequence_mean",
    "token_stats",
    "token_stats_from_logits",
]
