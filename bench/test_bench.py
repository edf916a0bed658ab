"""`pytest bench/`: the suite's CPU cases through pytest-benchmark (timings in its table; run
`python -m bench` for peak memory per fresh process, plots and the summary). Every provider must
agree with the naive fp32 result before it is timed."""

import pytest
import torch

from bench import providers as P
from bench.registry import head

MODEL, N = "cpu-small", 512
CASES = [(op, p) for op in P.OPS for p in P.providers(op, "cpu")]


@pytest.mark.parametrize("op, provider", CASES, ids=[f"{op}-{p}" for op, p in CASES])
def test_forward_backward(benchmark, op, provider):
    h, v = head(MODEL)
    err = P.agreement(op, h, v, n=256)[provider]
    assert isinstance(err, float) and err < 2e-3, err
    x = P.build(op, N, h, v)
    x["hidden"].requires_grad_()
    x["weight"].requires_grad_()
    fn = P.providers(op, "cpu")[provider]

    def step():
        fn(x).backward()
        x["hidden"].grad = x["weight"].grad = None

    torch.set_num_threads(2)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
