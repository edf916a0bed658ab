"""The verifier on a table of (response, ground truth, expected accuracy, expected format), with
every exploit shown failing."""

import pytest

from vlmfast.rewards import boxed_contents, extract_answer, is_correct, score

T = "<think>count the shapes</think> "
CHOICES = ["red", "green", "blue", "yellow"]

CASES = [
    # correct answers in many forms
    (T + "The answer is \\boxed{3}.", "3", None, 1, 1),
    (T + "\\boxed{3.0}", "3", None, 1, 1),
    (T + "\\boxed{\\frac{1}{2}}", "0.5", None, 1, 1),
    (T + "\\boxed{\\sqrt{12}}", "2\\sqrt{3}", None, 1, 1),
    (T + "\\boxed{x = 3}", "3", None, 1, 1),
    (T + "\\boxed{B}", "B", CHOICES, 1, 1),
    (T + "\\boxed{(B)}", "B", CHOICES, 1, 1),
    (T + "\\boxed{green}", "B", CHOICES, 1, 1),
    (T + "\\boxed{B}", "green", CHOICES, 1, 1),
    (T + "\\boxed{Green}", "green", CHOICES, 1, 1),
    # a choice named by its value, dressed, or with its letter (MathVista's golds are the choices' texts)
    (T + "\\boxed{1}", "1.0", ["0.5", "1.0", "2.0"], 1, 1),
    (T + "\\boxed{\\frac{1}{2}}", "0.5", ["0.5", "1.0"], 1, 1),
    (T + "\\boxed{45^\\circ}", "45°", ["30°", "45°"], 1, 1),
    (T + "\\boxed{\\text{B}}", "B", CHOICES, 1, 1),
    (T + "\\boxed{(B) green}", "B", CHOICES, 1, 1),
    (T + "\\boxed{Yes.}", "Yes", ["Yes", "No"], 1, 1),
    (T + "\\boxed{B}", "c", ["a", "c", "e"], 1, 1),  # choices that are letters: the gold is the text "c"
    (T + "\\boxed{c}", "c", ["a", "c", "e"], 1, 1),
    # wrong answers
    (T + "\\boxed{2}", "1.0", ["0.5", "1.0", "2.0"], 0, 1),
    (T + "\\boxed{(C) blue}", "B", CHOICES, 0, 1),
    (T + "\\boxed{e}", "c", ["a", "c", "e"], 0, 1),
    (T + "\\boxed{4}", "3", None, 0, 1),
    (T + "\\boxed{C}", "B", CHOICES, 0, 1),
    (T + "\\boxed{blue}", "B", CHOICES, 0, 1),
    # exploits: no accuracy
    (T + "\\boxed{}", "3", None, 0, 0),  # empty box
    (T + "\\boxed{ }", "3", None, 0, 0),  # blank box
    (T + "\\boxed{3} or \\boxed{4}", "3", None, 0, 0),  # several different boxed answers
    (T + "\\boxed{A}\\boxed{B}\\boxed{C}\\boxed{D}", "B", CHOICES, 0, 0),  # box every choice
    (T + "The answer is 3.", "3", None, 0, 0),  # answer outside a box
    ("<think>\\boxed{3}</think> I am not sure.", "3", None, 0, 0),  # box only inside the reasoning
    ("<think>so it is \\boxed{3}", "3", None, 0, 0),  # reasoning never closed: the box is inside it
    ("it is \\boxed{4} </think> \\boxed{3}", "3", None, 1, 0),  # the chat template opened <think> (Qwen3)
    (T + "\\boxed{3", "3", None, 0, 0),  # unbalanced
    (T + "\\boxed{3}\\boxed{4", "3", None, 0, 0),  # a second box that never closes could hold another answer
    (T + "\\boxed{Yes.}", "yes", None, 1, 1),  # a free-form word with its full stop
    (T + "\\boxed{\\text{red}}", "red", None, 1, 1),
    # format without the think block: accuracy still graded, format 0
    ("\\boxed{3}", "3", None, 1, 0),
    ("<think>a</think><think>b</think>\\boxed{3}", "3", None, 1, 0),  # two think blocks
    # the same answer boxed twice is not an exploit
    (T + "\\boxed{3}, so \\boxed{3}", "3", None, 1, 0),
]


@pytest.mark.parametrize("response,gold,choices,acc,fmt", CASES)
def test_reward_table(response, gold, choices, acc, fmt):
    r = score(response, gold, choices)
    assert (r.accuracy, r.format) == (acc, fmt), r
    assert r.reward == pytest.approx(0.9 * acc + 0.1 * fmt)


def test_boxed_contents_handles_nested_braces():
    assert boxed_contents("\\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == ["\\frac{1}{2}", "x^{2}"]
    assert extract_answer("no box here") is None


def test_boxed_token_indices_pick_the_answer_tokens():
    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_tokenizer
    from vlmfast.rewards import boxed_token_indices

    tok = build_tokenizer(corpus())
    ids = tok("<think>three</think> \\boxed{12}", add_special_tokens=False)["input_ids"]
    idx = boxed_token_indices(tok, ids)
    assert tok.decode([ids[j] for j in idx]).strip("{}") == "12"
    assert boxed_token_indices(tok, tok("no box", add_special_tokens=False)["input_ids"]) == []


def test_boxed_token_indices_end_at_the_matching_brace():
    """A boxed fraction: the answer tokens run to the } that closes the box, not to the fraction's first }."""
    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_tokenizer
    from vlmfast.rewards import boxed_token_indices

    tok = build_tokenizer(corpus())
    ids = tok("<think>a third of 40</think> \\boxed{\\frac{40}{3}} so", add_special_tokens=False)["input_ids"]
    picked = tok.decode([ids[j] for j in boxed_token_indices(tok, ids)])
    assert "\\frac{40}{3}" in picked and "so" not in picked, picked


@pytest.mark.parametrize("answer, gold, precision, right", [
    ("\\frac{1}{3}", "0.33", 2, True),  # MathVista's scorer rounds the answer to the gold's precision
    ("3.1416", "3.14", 2, True),
    ("3.15", "3.14", 2, False),
    ("0.333", "0.33", None, False),  # without a precision: math-verify's comparison
    ("0.333", "0.33", float("nan"), False),  # a missing precision as a parquet column holds it
    ("12", "12", 1, True),
])
def test_mathvista_precision(answer, gold, precision, right):
    assert is_correct(answer, gold, None, precision) is right


@pytest.mark.parametrize("boxed, gold", [("-\\frac{1}{2}", "-0.5"), ("\\frac12", "0.5"), ("50\\%", "50"),
                                         ("10\\,000", "10000"), ("\\dfrac{3}{4}", "0.75"), ("3.", "3")])
def test_the_numeric_reward_reads_numbers_as_written(boxed, gold):
    from vlmfast.rewards import numeric

    assert numeric([T + f"\\boxed{{{boxed}}}"], [gold]) == [1.0]
