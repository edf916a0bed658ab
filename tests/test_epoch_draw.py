"""A stage's examples are drawn as epoch permutations: every example once per epoch (with replacement, a 512-prompt
batch of 2,100 examples held ~12% repeats), the same global batches on any number of ranks, and a function of the
step alone (a resumed run draws what an uninterrupted one would)."""

from types import SimpleNamespace

from vlmfast import stages as S


def _ctx(n_examples=10, seed=0, index=0):
    return SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(seed=seed)), index=index,
                           train=list(range(n_examples)))


def _draws(ctx, steps, n, parts=1):
    return [S.batch_examples(ctx, step, n, parts)[0] for step in range(steps)]


def test_each_epoch_visits_every_example_once():
    ctx = _ctx(10)
    flat = [x for batch in _draws(ctx, 10, 4) for x in batch]  # 40 draws = 4 epochs of 10
    for e in range(4):
        assert sorted(flat[10 * e : 10 * (e + 1)]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch its own order
    assert _draws(_ctx(10, index=1), 3, 4) != _draws(ctx, 3, 4)  # each stage its own


def test_the_same_global_batches_on_two_ranks_and_after_a_resume(monkeypatch):
    ctx = _ctx(10)
    one = _draws(ctx, 6, 4, parts=2)
    for step in (0, 3, 5):
        halves = []
        for rank in (0, 1):
            monkeypatch.setattr(S.context, "world", lambda rank=rank: (rank, 2))
            exs, positions = S.batch_examples(ctx, step, 4, parts=2)
            halves += list(zip(positions, exs))
        assert [x for _, x in sorted(halves)] == one[step]
    monkeypatch.setattr(S.context, "world", lambda: (0, 1))
    assert S.batch_examples(ctx, 5, 4, 2)[0] == one[5]  # step 5 drawn alone (a resumed run): the same
