"""The negatives SFT with gentle negatives, DPO and CW-DPO push down when the data names none on-policy: every one is
an answer the verifier grades wrong (a negative it calls correct would train the model away from a right answer)."""

import random
from types import SimpleNamespace

import pytest

from vlmfast.rewards import is_correct
from vlmfast.stages.context import NO_ANSWER, _dataset_negative


def example(answer, choices=None, negatives=None):
    return SimpleNamespace(answer=answer, choices=choices, negatives=negatives)


@pytest.mark.parametrize("ex, allowed", [
    (example("B", ["3", "6", "9", "12"]), {"3", "9", "12"}),  # a letter answer: its choice text "6" is right
    (example("6", ["3", "6", "9", "12"]), {"3", "9", "12"}),
    (example("12 cm"), {"11 cm", "13 cm"}),  # not "12 cm?" (graded as 12 cm)
    (example("12", negatives=["12.0", "13", "11"]), {"13", "11"}),  # 12.0 is 12
    (example("inf"), {NO_ANSWER}),  # was an OverflowError
    (example("red"), {NO_ANSWER}),
])
def test_every_negative_is_graded_wrong(ex, allowed):
    drawn = {_dataset_negative(ex, random.Random(seed)) for seed in range(40)}
    assert drawn == allowed
    for negative in drawn - {NO_ANSWER}:
        assert not is_correct(negative, ex.answer, ex.choices), negative


def test_the_draw_follows_the_seed():
    ex = example("7", negatives=["5", "6", "8", "9"])
    assert [_dataset_negative(ex, random.Random(3)) for _ in range(3)] == [_dataset_negative(ex, random.Random(3))] * 3
