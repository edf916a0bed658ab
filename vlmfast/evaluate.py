"""Evaluation metrics: accuracy, unbiased pass@k with a problem-level bootstrap interval,
calibration (ECE), answer diversity.

    pass@k  = 1 - C(n - c, k) / C(n, k)      per problem, from n >= k samples of which c are correct
    ECE     = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|     equal-width confidence bins
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021), in the stable product form."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_interval(correct: Sequence[int], n: int, k: int, *, bootstrap: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """Mean pass@k over problems with a percentile bootstrap interval resampling problems."""
    if not correct:
        raise ValueError("no problems to evaluate")
    per = [pass_at_k(n, c, k) for c in correct]
    mean = sum(per) / len(per)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(per, k=len(per))) / len(per) for _ in range(bootstrap))
    lo = means[int((1 - level) / 2 * (bootstrap - 1))]
    hi = means[int((1 + level) / 2 * (bootstrap - 1))]
    return mean, lo, hi


def pass_at_k_curve(correct: Sequence[int], n: int) -> list[float]:
    """Mean pass@k for k = 1..n."""
    return [sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)]


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences but {len(correct)} outcomes")
    if not confidence:
        return 0.0
    total, err = len(confidence), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(confidence) if (lo < p <= hi) or (b == 0 and p == 0.0)]
        if idx:
            acc = sum(bool(correct[i]) for i in idx) / len(idx)
            conf = sum(confidence[i] for i in idx) / len(idx)
            err += len(idx) / total * abs(acc - conf)
    return err


def answer_diversity(answers_per_problem: Sequence[Sequence[str | None]]) -> float:
    """Mean number of distinct final answers among each problem's samples (None = no answer)."""
    if not answers_per_problem:
        return 0.0
    return sum(len({a for a in answers if a is not None}) for answers in answers_per_problem) / len(
        answers_per_problem)


def mean_confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and normal-approximation half-width (for accuracies over many problems)."""
    if not values:
        return 0.0, 0.0
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    z = 1.959963984540054 if level == 0.95 else _z(level)
    return m, z * math.sqrt(var / len(values))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf((1 + level) / 2)


def answer_confidence(tokenizer, token_ids: list[int], logprobs: list[float]) -> float:
    """Probability the policy gave its answer: exp(sum of log-probs of the tokens inside the last
    \\boxed{...}); 0 when there is no box (such a completion has no answer, and no place in the ECE)."""
    from .rewards import boxed_token_indices

    idx = boxed_token_indices(tokenizer, token_ids)
    return math.exp(sum(logprobs[j] for j in idx)) if idx else 0.0


# what evaluate_policy returns per split, and what the trainer adds (entropy on own samples)
SPLIT_METRICS = ("accuracy", "accuracy_ci95", "format", "ece", "diversity", "sample_reward", "entropy",
                 "entropy_answer")


def split_metric_names(ks) -> list[str]:
    """Names of one split's evaluation metrics with pass@k for each k (the record prefixes the split)."""
    return [*SPLIT_METRICS, *(f"pass@{k}{end}" for k in ks for end in ("", "_lo", "_hi"))]


def sampled_count(n: int, sample_problems: int | None) -> int:
    """How many of n problems are sampled (the first ones): eval.sample_problems, default all."""
    return n if sample_problems is None else min(sample_problems, n)


def eval_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per problem, by its place in the split: a problem's samples are the same whichever
    rank (and batch) generates it."""
    return [(seed * 1_000_003 + i) % (2**31 - 1) for i in range(n)]


def eval_generations(engine, examples, sampled_examples, *, n_samples: int, temperature: float, max_new_tokens: int,
                     seeds: list[int]) -> tuple[list, list]:
    """The greedy completion of every example, and n_samples samples of each of `sampled_examples` (seeded one
    seed per example): ([Completion], [[Completion]])."""
    from .rollout import Sampling

    greedy = engine.generate([e.problem for e in examples], [e.images for e in examples], n=1,
                             sampling=Sampling(temperature=0.0, max_new_tokens=max_new_tokens))
    groups = engine.generate([e.problem for e in sampled_examples], [e.images for e in sampled_examples],
                             n=n_samples, sampling=Sampling(temperature=temperature, max_new_tokens=max_new_tokens),
                             seeds=seeds) if sampled_examples else []
    return [g[0] for g in greedy], groups


def eval_metrics(processor, examples, greedy: list, samples: list, *, n_samples: int, ks, seed: int = 0
                 ) -> tuple[dict, dict]:
    """Greedy accuracy (with a 95% interval), ECE and format rate of the greedy completions of `examples`;
    pass@k with bootstrap intervals, answer diversity and mean reward of the sample groups (samples[i]: the
    groups of examples[i], for the first len(samples) examples).
    Returns (metrics, samples): the policy's own completions (for entropy) and a few generations to show."""
    from .rewards import extract_answer, score_example

    g_scores = [score_example(g.text, e) for g, e in zip(greedy, examples)]
    acc = [s.accuracy for s in g_scores]
    conf = [answer_confidence(processor.tokenizer, g.token_ids, g.logprobs) for g in greedy]
    metrics = {}
    metrics["accuracy"], metrics["accuracy_ci95"] = mean_confidence_interval(acc)
    metrics["format"] = sum(s.format for s in g_scores) / len(g_scores)
    # over the answered completions: one without a gradable answer has no confidence to calibrate (scored as a
    # wrong answer at confidence 0, every unanswered response would pull the error toward 0)
    answered = [i for i, s in enumerate(g_scores) if s.extracted is not None]
    metrics["ece"] = (expected_calibration_error([conf[i] for i in answered], [acc[i] > 0 for i in answered])
                      if answered else float("nan"))
    correct, answers, rewards = [], [], []
    kept = list(zip(samples, examples))
    for group, e in kept:
        scores = [score_example(c.text, e) for c in group]
        correct.append(sum(int(s.accuracy) for s in scores))
        answers.append([extract_answer(c.text) for c in group])
        rewards += [s.reward for s in scores]
    for k in ks:
        m, lo, hi = pass_at_k_interval(correct, n_samples, k, seed=seed)
        metrics[f"pass@{k}"], metrics[f"pass@{k}_lo"], metrics[f"pass@{k}_hi"] = m, lo, hi
    metrics["diversity"] = answer_diversity(answers)
    metrics["sample_reward"] = sum(rewards) / len(rewards)
    out = {"problems": [e.problem for _, e in kept], "images": [e.images for _, e in kept],
           "completions": [c for g, _ in kept for c in g], "pass_curve": pass_at_k_curve(correct, n_samples),
           "examples": [{"problem": e.problem, "answer": e.answer, "greedy": g.text}
                        for e, g in list(zip(examples, greedy))[:4]]}
    return metrics, out


def evaluate_policy(engine, processor, examples, *, n_samples: int, ks, temperature: float, max_new_tokens: int,
                    seed: int = 0, sample_problems: int | None = None) -> tuple[dict, dict]:
    """eval_generations then eval_metrics in one process: greedy metrics on `examples`, sampled ones on the
    first `sample_problems` (default all: sampling costs n_samples greedy passes, so a large split is sampled on
    a subset), each problem's samples seeded by its place (eval_seeds)."""
    m = sampled_count(len(examples), sample_problems)
    greedy, samples = eval_generations(engine, examples, examples[:m], n_samples=n_samples, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seeds=eval_seeds(seed, m))
    return eval_metrics(processor, examples, greedy, samples, n_samples=n_samples, ks=ks, seed=seed)
