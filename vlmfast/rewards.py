"""Verifiable rewards: `\\boxed{}` extraction, grading with math-verify, format reward.

    reward = 0.9 * accuracy + 0.1 * format           (each also returned on its own)

The verifier is hardened against the usual exploits, each of which earns no accuracy:
an empty `\\boxed{}`, several boxes with different answers, an answer written outside any box, and
a box inside the <think> block only (the answer must come after the reasoning).
Multiple-choice answers match by letter ("B", "(B)", "B.") or by the choice's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ACCURACY_WEIGHT, FORMAT_WEIGHT = 0.9, 0.1
_THINK = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.S)
_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\.?$")


@dataclass(frozen=True)
class Reward:
    reward: float
    accuracy: float
    format: float
    extracted: str | None  # the graded boxed answer, None if none could be graded


def boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} (balanced braces), in order; unbalanced boxes are skipped."""
    out, i = [], 0
    while True:
        start = text.find("\\boxed{", i)
        if start < 0:
            return out
        j, depth = start + len("\\boxed{"), 1
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            return out  # unbalanced: nothing after it can be trusted
        out.append(text[start + len("\\boxed{") : j - 1])
        i = j


def format_reward(response: str) -> float:
    """1 when the response is `<think>...</think>` followed by exactly one non-empty \\boxed{} answer."""
    m = _THINK.match(response)
    if not m or "<think>" in m["answer"] or "</think>" in m["answer"]:
        return 0.0
    boxes = boxed_contents(m["answer"])
    return 1.0 if len(boxes) == 1 and boxes[0].strip() else 0.0


def extract_answer(response: str) -> str | None:
    """The single boxed answer after </think> (or anywhere if there is no think block); None when
    there is no box, an empty box, or boxes that disagree."""
    m = _THINK.match(response)
    region = m["answer"] if m else response
    boxes = [b.strip() for b in boxed_contents(region)]
    if not boxes or any(not b for b in boxes) or len(set(boxes)) > 1:
        return None
    return boxes[0]


def _choice_index(answer: str, choices: list[str]) -> int | None:
    m = _LETTER.match(answer.strip())
    if m:
        k = ord(m.group(1).upper()) - ord("A")
        return k if 0 <= k < len(choices) else None
    norm = answer.strip().lower()
    hits = [i for i, c in enumerate(choices) if str(c).strip().lower() == norm]
    return hits[0] if len(hits) == 1 else None


def _math_equal(gold: str, answer: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g, a = parse(f"${gold}$", extraction_config=cfg), parse(f"${answer}$", extraction_config=cfg)
    if not g or not a:
        return gold.strip().lower() == answer.strip().lower()
    return bool(verify(g, a))


def is_correct(answer: str | None, gold, choices: list[str] | None = None) -> bool:
    """Grade an extracted answer against the ground truth (numbers, fractions, roots, expressions,
    or a multiple-choice letter / choice text when `choices` are given)."""
    if answer is None:
        return False
    gold = str(gold).strip()
    if choices:
        gi = _choice_index(gold, choices)
        ai = _choice_index(answer, choices)
        if gi is not None:
            return ai == gi
    if gold.lower() == answer.strip().lower():
        return True
    return _math_equal(gold, answer)


def score(response: str, gold, choices: list[str] | None = None) -> Reward:
    """Reward of one response: 0.9 * accuracy + 0.1 * format, with both parts."""
    fmt = format_reward(response)
    answer = extract_answer(response)
    acc = 1.0 if is_correct(answer, gold, choices) else 0.0
    return Reward(reward=ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, accuracy=acc, format=fmt, extracted=answer)


def boxed_token_indices(tokenizer, token_ids: list[int]) -> list[int]:
    """Indices of the tokens that spell the content of the last \\boxed{...} (the answer tokens)."""
    text, spans = "", []
    for t in token_ids:
        piece = tokenizer.decode([t])
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    start = text.rfind("\\boxed{")
    if start < 0:
        return []
    lo, hi = start + len("\\boxed{"), text.find("}", start)
    hi = len(text) if hi < 0 else hi
    return [j for j, (a, z) in enumerate(spans) if z > lo and a < hi]


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; verl's overlong_buffer): 0 up to
    max_new_tokens - buffer tokens, then falling linearly to -factor at max_new_tokens (-factor beyond)."""
    exceed = length - (max_new_tokens - buffer)
    return -factor * min(max(exceed, 0) / buffer, 1.0)
