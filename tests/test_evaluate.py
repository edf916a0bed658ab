"""pass@k against brute-force enumeration, the bootstrap interval, ECE on hand-built bins, diversity."""

import itertools
import math

import pytest

from vlmfast.evaluate import (
    answer_diversity,
    expected_calibration_error,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_interval,
)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 4), (8, 1, 8), (7, 7, 2), (10, 4, 5)])
def test_pass_at_k_equals_enumeration_of_subsets(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_curve_is_monotone_and_interval_brackets_mean():
    correct = [0, 1, 2, 4, 4, 0, 3]
    curve = pass_at_k_curve(correct, 4)
    assert curve == sorted(curve) and curve[0] == pytest.approx(sum(correct) / (4 * len(correct)))
    mean, lo, hi = pass_at_k_interval(correct, 4, 2, bootstrap=500)
    assert lo <= mean <= hi and hi - lo > 0
    assert pass_at_k_interval([4] * 5, 4, 1) == (1.0, 1.0, 1.0)


def test_ece_on_hand_built_bins():
    # bin (0.7, 0.8]: conf 0.75 x2, one right -> |0.5 - 0.75|; bin (0.9, 1]: conf 0.95 x2, both right
    conf = [0.75, 0.75, 0.95, 0.95]
    ok = [True, False, True, True]
    assert expected_calibration_error(conf, ok) == pytest.approx(0.5 * 0.25 + 0.5 * 0.05)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0


def test_diversity():
    assert answer_diversity([["3", "3", "4"], ["red", None, "red"], [None]]) == pytest.approx((2 + 1 + 0) / 3)


def test_greedy_on_every_problem_samples_on_the_first_ones():
    """sample_problems: accuracy from the greedy answer of every problem, pass@k from n samples of the first
    sample_problems only (the engine is asked for exactly those)."""
    from types import SimpleNamespace

    from vlmfast.evaluate import evaluate_policy
    from vlmfast.rollout import Completion

    class Engine:  # greedy answers "1"; sampled answers "2"; it records what it was asked
        def __init__(self):
            self.asked = []

        def generate(self, problems, images, n=1, sampling=None, seeds=None):
            self.asked.append((len(problems), n))
            ans = "1" if sampling.temperature == 0 else "2"
            return [[Completion(token_ids=[5], text=f"<think>x</think> \\boxed{{{ans}}}", logprobs=[-0.1],
                                finish_reason="stop") for _ in range(n)] for _ in problems]

    exs = [SimpleNamespace(problem=f"p{i}", images=[], answer="1" if i < 4 else "2", choices=None) for i in range(6)]
    engine = Engine()
    tok = SimpleNamespace(convert_tokens_to_ids=lambda t: 0, decode=lambda ids: "1")
    m, samples = evaluate_policy(engine, SimpleNamespace(tokenizer=tok), exs, n_samples=3, ks=[1, 3], temperature=1.0,
                                 max_new_tokens=8, sample_problems=2)
    assert engine.asked == [(6, 1), (2, 3)]
    assert m["accuracy"] == pytest.approx(4 / 6)  # greedy "1" is right on the first four of six
    assert m["pass@1"] == 0.0 and m["pass@3"] == 0.0  # the two sampled problems want "1", samples say "2"
    assert len(samples["problems"]) == 2 and len(samples["completions"]) == 6


def test_ece_is_over_the_answered_completions():
    """10 wrong answers given with confidence 0.9 are miscalibrated by 0.9, whatever number of completions beside
    them has no answer at all (scored as wrong at confidence 0, 90 of them made it 0.09)."""
    import math
    from types import SimpleNamespace

    from vlmfast.evaluate import eval_metrics
    from vlmfast.rollout import Completion

    pieces = {1: "\\boxed{", 2: "7", 3: "}", 4: "dunno"}
    tok = SimpleNamespace(decode=lambda ids: "".join(pieces[i] for i in ids))
    boxed = Completion(token_ids=[1, 2, 3], text="<think>x</think> \\boxed{7}", logprobs=[0.0, math.log(0.9), 0.0],
                       finish_reason="stop")
    unboxed = Completion(token_ids=[4], text="<think>x</think> dunno", logprobs=[-0.1], finish_reason="stop")
    exs = [SimpleNamespace(problem="p", images=[], answer="3", choices=None) for _ in range(100)]
    sample = [[boxed]]
    m, _ = eval_metrics(SimpleNamespace(tokenizer=tok), exs, [boxed] * 10 + [unboxed] * 90, sample, n_samples=1,
                        ks=[1])
    assert m["ece"] == pytest.approx(0.9) and m["accuracy"] == 0.0
    m, _ = eval_metrics(SimpleNamespace(tokenizer=tok), exs[:1], [unboxed], sample, n_samples=1, ks=[1])
    assert math.isnan(m["ece"])  # nothing answered: nothing to calibrate
