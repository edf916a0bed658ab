"""Prompt formatting: the problem (images in place of its <image> markers), then the instruction to
reason inside <think> </think> and answer in \\boxed{}, as chat messages for the processor's
template."""

from __future__ import annotations

from .formats import IMAGE_MARKER

DEFAULT_REASONING = "I look at the shapes."  # the <think> text of SFT targets built from answers
INSTRUCTION = "Think step by step inside <think> </think>, then give the final answer in \\boxed{}."


def user_content(problem: str) -> list[dict]:
    """Chat content parts: images where the problem has <image> markers, then the instruction."""
    parts = []
    pieces = problem.split(IMAGE_MARKER)
    for i, text in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
    parts.append({"type": "text", "text": ("\n" if parts else "") + INSTRUCTION})
    return parts


def messages(problem: str, response: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": user_content(problem)}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def target_response(reasoning: str, answer: str) -> str:
    """A well-formed response: the format the reward checks."""
    return f"<think>{reasoning}</think> \\boxed{{{answer}}}"


def reasoning_of(cfg, example=None) -> str:
    """The <think> text of an SFT target: the example's own `reasoning` column when the data has one
    and data.reasoning is "auto", else data.reasoning (or the default sentence)."""
    r = cfg.data.reasoning
    if r == "auto":
        own = example is not None and example.meta.get("reasoning")
        return own or DEFAULT_REASONING
    return r
