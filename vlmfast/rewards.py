"""Verifiable rewards: `\\boxed{}` extraction, grading with math-verify, format reward.

    reward = 0.9 * accuracy + 0.1 * format           (each also returned on its own)

The verifier is hardened against the usual exploits, each of which earns no accuracy:
an empty `\\boxed{}`, several boxes with different answers, an answer written outside any box, and
a box inside the <think> block only, or in reasoning never closed (the answer must come after the reasoning).
Multiple-choice answers match by letter ("B", "(B)", "B.", "(B) its text"), by the choice's text (\\text{} and a
final period aside), or by its value ("1" for a choice "1.0").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ACCURACY_WEIGHT, FORMAT_WEIGHT = 0.9, 0.1
_THINK = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.S)
_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\.?$")
_LETTERED = re.compile(r"^\(([A-Za-z])\)\s+\S")  # "(B) its text"


@dataclass(frozen=True)
class Reward:
    reward: float
    accuracy: float
    format: float
    extracted: str | None  # the graded boxed answer, None if none could be graded


def _box_end(text: str, start: int) -> int:
    """Where the \\boxed{ at `start` closes: the index of its matching }, or -1 when its braces never balance."""
    j, depth = start + len("\\boxed{"), 1
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return -1 if depth else j - 1


def boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} (balanced braces), in order; unbalanced boxes are skipped."""
    out, i = [], 0
    while True:
        start = text.find("\\boxed{", i)
        if start < 0:
            return out
        end = _box_end(text, start)
        if end < 0:
            return out  # unbalanced: nothing after it can be trusted
        out.append(text[start + len("\\boxed{") : end])
        i = end + 1


def format_reward(response: str) -> float:
    """1 when the response is `<think>...</think>` followed by exactly one non-empty \\boxed{} answer."""
    m = _THINK.match(response)
    if not m or "<think>" in m["answer"] or "</think>" in m["answer"]:
        return 0.0
    boxes = boxed_contents(m["answer"])
    return 1.0 if len(boxes) == 1 and boxes[0].strip() and m["answer"].count("\\boxed{") == 1 else 0.0


def extract_answer(response: str) -> str | None:
    """The single boxed answer after </think> (anywhere when the response has no think block); None when there is
    no box, an empty box, boxes that disagree, or reasoning never closed (a box there is inside the reasoning: a
    response cut off mid-thought, or a policy that learned to skip </think>, earns nothing)."""
    if "</think>" in response:  # also a response whose <think> the chat template opened (Qwen3's)
        region = response.split("</think>", 1)[1]
    elif "<think>" in response:
        return None
    else:
        region = response
    boxes = [b.strip() for b in boxed_contents(region)]
    if not boxes or any(not b for b in boxes) or len(set(boxes)) > 1 or region.count("\\boxed{") > len(boxes):
        return None  # (a box that never closes could hold another answer)
    return boxes[0]


def _plain(answer: str) -> str:
    """An answer without the dressing that does not change it: \\text{...} (\\textbf, \\mathrm), $...$, a final
    period."""
    a = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", answer.strip())
    return a.strip().strip("$").strip().rstrip(".").strip()


def _choice_index(answer: str, choices: list[str], *, by_value: bool = True) -> int | None:
    """The choice `answer` names: a choice's text (first: a choice may itself be a letter), a letter ("B", "(B)",
    "B.", "(B) its text"), or, with `by_value`, the one choice equal to it as math ("1" for "1.0", "\\frac{1}{2}"
    for "0.5")."""
    a = _plain(answer)
    hits = [i for i, c in enumerate(choices) if _plain(str(c)).lower() == a.lower()]
    if len(hits) == 1:
        return hits[0]
    m = _LETTER.match(a) or _LETTERED.match(a)
    if m:
        k = ord(m.group(1).upper()) - ord("A")
        return k if 0 <= k < len(choices) else None
    if by_value:
        hits = [i for i, c in enumerate(choices) if _math_equal(str(c), a)]
        return hits[0] if len(hits) == 1 else None
    return None


def _math_equal(gold: str, answer: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g, a = parse(f"${gold}$", extraction_config=cfg), parse(f"${answer}$", extraction_config=cfg)
    if not g or not a:
        return gold.strip().lower() == answer.strip().lower()
    return bool(verify(g, a))


def is_correct(answer: str | None, gold, choices: list[str] | None = None, precision=None) -> bool:
    """Grade an extracted answer against the ground truth (numbers, fractions, roots, expressions,
    or a multiple-choice letter / choice text when `choices` are given). With `precision` (MathVista's, decimals),
    a number is right when it rounds to the gold at that precision, as MathVista's own scorer rounds it."""
    if answer is None:
        return False
    gold = str(gold).strip()
    if precision is not None and not (isinstance(precision, float) and math.isnan(precision)):
        a, g = _number(answer), _number(gold)
        if a is not None and g is not None:
            return round(a, int(precision)) == round(g, int(precision))
    if choices:
        gi = _choice_index(gold, choices, by_value=False)
        if gi is not None:
            return _choice_index(answer, choices) == gi
    if _plain(gold).lower() == _plain(answer).lower():  # "Yes." for "yes", \\text{red} for "red"
        return True
    return _math_equal(gold, answer)


def score(response: str, gold, choices: list[str] | None = None, precision=None) -> Reward:
    """Reward of one response: 0.9 * accuracy + 0.1 * format, with both parts."""
    fmt = format_reward(response)
    answer = extract_answer(response)
    acc = 1.0 if is_correct(answer, gold, choices, precision) else 0.0
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
    lo, hi = start + len("\\boxed{"), _box_end(text, start)  # balanced braces: \\boxed{\\frac{40}{3}}
    hi = len(text) if hi < 0 else hi
    return [j for j, (a, z) in enumerate(spans) if z > lo and a < hi]


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; verl's overlong_buffer): 0 up to
    max_new_tokens - buffer tokens, then falling linearly to -factor at max_new_tokens (-factor beyond)."""
    exceed = length - (max_new_tokens - buffer)
    return -factor * min(max(exceed, 0) / buffer, 1.0)


# ---- built-in reward functions for a stage's `rewards:` list (reward_plugins.py calls them) --------------------
# Each takes a batch as lists (completions, answer, choices, completion_ids, every dataset column) and keyword
# arguments it does not read, and returns one float, or None (no reward for that sample), per completion.

def score_example(response: str, example) -> Reward:
    """score() against an example: its answer, choices and (MathVista) precision."""
    return score(response, example.answer, example.choices, (getattr(example, "meta", None) or {}).get("precision"))


def accuracy(completions, answer, choices=None, precision=None, **_) -> list[float]:
    """1 when the single boxed answer after the reasoning is correct (the hardened verifier above), else 0."""
    choices = choices or [None] * len(completions)
    precision = precision or [None] * len(completions)
    return [1.0 if is_correct(extract_answer(c), a, ch, p) else 0.0
            for c, a, ch, p in zip(completions, answer, choices, precision)]


def format(completions, **_) -> list[float]:  # noqa: A001 (the reward's name in a recipe)
    """1 when the response is <think>...</think> then exactly one non-empty \\boxed{} answer, else 0."""
    return [format_reward(c) for c in completions]


def choice_letter(completions, answer, choices=None, **_) -> list[float | None]:
    """Multiple choice: 1 when the boxed answer names the gold choice (by letter or text), 0 otherwise; None for an
    example without choices."""
    choices = choices or [None] * len(completions)
    out = []
    for c, a, ch in zip(completions, answer, choices):
        if not ch:
            out.append(None)
            continue
        got, gold = extract_answer(c), _choice_index(str(a), ch)
        out.append(1.0 if got is not None and gold is not None and _choice_index(got, ch) == gold else 0.0)
    return out


def _number(text: str | None) -> float | None:
    """A number as written: plain (3, -2.5, 10,000, 10\\,000, 50\\%), a fraction a/b or \\frac{a}{b} (\\dfrac,
    \\tfrac, \\frac12), with its sign; else None."""
    if text is None:
        return None
    t = _plain(text).replace("\\,", "").replace("\\!", "").replace(" ", "").replace(",", "")
    t = t.removesuffix("\\%").removesuffix("%")
    sign = -1.0 if t.startswith("-") else 1.0
    t = t[1:] if t[:1] in "+-" else t
    m = (re.fullmatch(r"\\[dt]?frac\{([\d.]+)\}\{([\d.]+)\}", t) or re.fullmatch(r"\\[dt]?frac(\d)(\d)", t)
         or re.fullmatch(r"([\d.]+)/([\d.]+)", t))
    try:
        return sign * (float(m.group(1)) / float(m.group(2)) if m else float(t))
    except (ValueError, ZeroDivisionError):
        return None


def numeric(completions, answer, tolerance: float = 0.01, **_) -> list[float | None]:
    """1 when the boxed number is within `tolerance` (relative, of max(1, |gold|)) of the gold number, else 0;
    None for an example whose answer is not a number."""
    out = []
    for c, a in zip(completions, answer):
        gold = _number(str(a))
        if gold is None:
            out.append(None)
            continue
        got = _number(extract_answer(c))
        out.append(1.0 if got is not None and abs(got - gold) <= tolerance * max(1.0, abs(gold)) else 0.0)
    return out


def length_penalty(completion_ids, max_new_tokens, **_) -> list[float]:
    """-(response tokens / max_new_tokens), in [-1, 0]: with a small weight, the shorter of two equal answers wins."""
    return [-len(ids) / max_new_tokens for ids in completion_ids]


_BOX = re.compile(r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")


def _box(text: str | None) -> tuple[float, float, float, float] | None:
    m = _BOX.search(text or "")
    return None if m is None else tuple(float(x) for x in m.groups())


def box_iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2] (0 when either is empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - w * h
    return w * h / union if union > 0 else 0.0


def grounding_iou(completions, answer, **_) -> list[float | None]:
    """Grounding (a VLM task beyond math): the IoU of the box [x1, y1, x2, y2] in the boxed answer with the gold box
    (0 without a box); None for an example whose answer is not a box."""
    out = []
    for c, a in zip(completions, answer):
        gold, got = _box(str(a)), _box(extract_answer(c))
        out.append(None if gold is None else box_iou(got, gold) if got is not None else 0.0)
    return out
