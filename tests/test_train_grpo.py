"""GRPO in the trainer end to end on the tiny model (CPU, one process): the rollout's log-prob passes in update-sized
slices, micro-batched updates equal to the whole update (and their metrics combined exactly), the GRPO family's options
from a recipe, a KL in the reward, several passes over a rollout (epochs_per_rollout)."""

import pytest
from test_train import _ragged_data, recipe, records

from vlmfast.train import run

pytestmark = pytest.mark.slow


def test_rollout_recomputes_in_update_sized_slices(tmp_path, monkeypatch):
    """Old and reference log-probs are recomputed over a rollout batch in slices of one update's rows
    on this rank (batch_size / ranks x group_size), never in slices of the global batch: as if rank 0 of
    2, each no-grad forward holds 1 prompt x 4 samples, though an update of the global batch holds 2."""
    import torch

    from vlmfast import stages as S

    for module in (S.context, S.grpo_rollout):  # collectives still see the one-process world
        monkeypatch.setattr(module, "world", lambda: (0, 2))
    sizes = []
    real = S.context.trunk_hidden

    def spy(model, **batch):
        if not torch.is_grad_enabled():
            sizes.append(batch["input_ids"].shape[0])
        return real(model, **batch)

    for module in (S.context, S.grpo_rollout):  # the update's forward, and the rollout's no-grad ones
        monkeypatch.setattr(module, "trunk_hidden", spy)
    stages = [{"type": "grpo", "name": "grpo", "steps": 1, "lr": 1e-4, "batch_size": 2, "group_size": 4,
               "updates_per_rollout": 2, "kl_coef": 0.1, "max_new_tokens": 4}]
    run(recipe(tmp_path, stages, eval={"at_start": False, "probes": 0}))
    # rank 0's rollout: 2 updates x 1 prompt x 4 samples; old and reference log-probs, 2 slices each
    assert sizes == [4, 4, 4, 4]


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_micro_batched_update_equals_the_whole_update(tmp_path, monkeypatch, aggregation):
    """GRPO with micro_batch_size 2 of an update's 8 sequences: 4 forwards of 2 rows with backward between
    them (and old / reference log-probs recomputed in the same 2-row slices), yet every step's loss and
    metrics and the final weights are the whole update's. The per-sequence mean weighs each micro-batch by
    its rows; a share computed as the micro-batch's own mean would be 4x too large."""
    import torch

    from vlmfast import stages as S
    from vlmfast.models import load_model

    sizes = []
    real = S.context.trunk_hidden

    tokens = []

    def spy(model, **batch):
        sizes.append((torch.is_grad_enabled(), batch["input_ids"].shape[0]))
        tokens.append((torch.is_grad_enabled(), int(batch["attention_mask"].sum())))
        return real(model, **batch)

    for module in (S.context, S.grpo_rollout):  # the update's forward, and the rollout's no-grad ones
        monkeypatch.setattr(module, "trunk_hidden", spy)
    grpo = {"type": "grpo", "name": "grpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "group_size": 4,
            "updates_per_rollout": 2, "kl_coef": 0.1, "entropy_coef": 0.05, "max_new_tokens": 6,
            "aggregation": aggregation}
    runs = {}
    data = _ragged_data(tmp_path)  # prompts with one or two images: each micro-batch takes its rows' images
    budget = 150  # real tokens: about two of these sequences (image tokens and prompt included)
    for micro in (None, 2, 3, "tokens"):
        sizes.clear()
        tokens.clear()
        name = f"micro{micro}"
        over = {"max_tokens_per_micro_batch": budget} if micro == "tokens" else {"micro_batch_size": micro}
        run(recipe(tmp_path, [{**grpo, **over}], name=name, eval={"at_start": False, "probes": 0}, data=data))
        runs[micro] = records(tmp_path, name), load_model(str(tmp_path / name / "checkpoints" / "final-0" / "hf"))[0]
        if micro == 2:  # old and reference log-probs of 16 sequences, then 2 updates x 4 micro-batches: 2 rows each
            assert sizes == [(False, 2)] * 16 + [(True, 2)] * 8
        if micro == 3:  # 8 rows per update at most 3 a forward: 3, 3 and 2
            assert [n for grad, n in sizes if grad] == [3, 3, 2] * 2
        if micro == "tokens":  # whole sequences up to the budget (one longer sequence alone), several per update
            forwards = [(n, t) for (grad, n), (_, t) in zip(sizes, tokens) if grad]
            assert len(forwards) > 2 and all(t <= budget or n == 1 for n, t in forwards), forwards
            assert sum(n for n, _ in forwards) == 16  # 2 updates x 8 rows, each row in one micro-batch
    from vlmfast.models import tiny_vlm

    init = tiny_vlm("student", seed=0)[0].state_dict()
    whole, w_model = runs[None]
    for m in (2, 3, "tokens"):
        micro, m_model = runs[m]
        assert [r["step"] for r in micro] == [1, 2]
        for a, b in zip(whole, micro):
            for key in ("loss", "pg_loss", "entropy", "kl", "ratio_mean", "ratio_min", "ratio_max", "clip_frac_low",
                        "reward", "response_tokens"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (m, key)
        assert micro[1]["ratio_mean"] != 1.0  # the second update runs on a moved policy
        a, b = w_model.state_dict(), m_model.state_dict()
        u1 = torch.cat([(a[k] - init[k]).flatten() for k in init])
        u2 = torch.cat([(b[k] - init[k]).flatten() for k in init])
        assert ((u1 - u2).norm() / u1.norm()).item() < 1e-3, m


def test_grpo_family_options_train_from_a_recipe(tmp_path):
    """GSPO with the k1 KL, sequence-level masked importance sampling, DAPO's overlong filtering and soft punishment
    from a recipe: it trains, a response cut at max_new_tokens counts in no loss, and each is punished by
    overlong_penalty (the shorter ones by less)."""
    import math

    grpo = {"type": "grpo", "name": "grpo", "steps": 2, "lr": 1e-3, "batch_size": 2, "group_size": 4,
            "max_new_tokens": 4, "loss_type": "gspo", "kl_coef": 0.05, "kl_estimator": "k1", "tis_cap": 3.0,
            "is_cap_low": 0.2, "is_level": "sequence", "is_mode": "mask", "mask_truncated": True,
            "overlong_buffer": 2, "overlong_penalty": 0.5, "updates_per_rollout": 2}
    run(recipe(tmp_path, [grpo], eval={"at_start": False, "probes": 0}))
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    for r in recs:
        assert r["truncated"] > 0
        assert r["response_tokens"] <= 4 * (1 - r["truncated"]) + 1e-6  # truncated rows: no counted token
        assert -0.5 <= r["overlong_penalty"] <= -0.5 * r["truncated"] + 1e-6
        assert r["ratio_min"] == r["ratio_max"] == 1.0 or r["step"] == 2  # the first update is on-policy


def test_kl_in_reward_takes_the_kl_from_the_reward_not_the_loss(tmp_path, monkeypatch):
    """kl_in_reward: the rollout policy's KL to the reference, x kl_coef, leaves each sample's reward (zero at the
    first rollout: the policy is the reference), and the loss has no KL term."""
    (tmp_path / "parity_reward.py").write_text(
        "def parity(completion_ids, **_):\n    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a reward that varies within groups: the policy moves
    grpo = {"type": "grpo", "name": "grpo", "steps": 3, "lr": 5e-3, "batch_size": 2, "group_size": 4,
            "max_new_tokens": 6, "kl_coef": 0.5, "kl_in_reward": True, "rewards": [{"fn": "parity_reward:parity"}]}
    run(recipe(tmp_path, [grpo], eval={"at_start": False, "probes": 0}))
    recs = records(tmp_path)
    assert recs[0]["kl_penalty"] == 0.0 and recs[-1]["kl_penalty"] > 0
    for r in recs:  # the reward function's less the penalty
        assert r["reward"] == pytest.approx(r["reward/parity"] - r["kl_penalty"], abs=1e-5)
        assert r["loss"] == pytest.approx(r["pg_loss"], abs=1e-6)  # no KL term in the loss


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_grpo_metrics_of_micro_batches_combine_exactly_on_the_model_device(device, monkeypatch):
    """An update in two micro-batches: token means weigh each by its tokens, a per-sequence pg_loss by its rows,
    extremes by min/max; the rollout's rewards, truncation and penalties are the update rows' means, a reward
    function's over the samples it scored; the weights the ranks combine with are the update's counts. The weights
    live where the loss's metrics do (the meta device stands in for a GPU: CPU weights times CUDA metrics raised on
    every GRPO step)."""
    from types import SimpleNamespace

    import torch

    from vlmfast.rewards import Reward
    from vlmfast.stages import _TOKEN_MEAN_METRICS
    from vlmfast.stages import grpo as G

    def metrics(v, lo, hi):
        m = {k: torch.tensor(v, device=device) for k in _TOKEN_MEAN_METRICS + ("pg_loss",)}
        return {**m, "ratio_min": torch.tensor(lo, device=device), "ratio_max": torch.tensor(hi, device=device)}

    parts = {0: metrics(1.0, 0.9, 1.1), 2: metrics(3.0, 0.7, 1.05)}  # by first row: 3 tokens, 2 rows; 1 token, 2 rows
    monkeypatch.setattr(G, "_grpo_forward", lambda ctx, ro, sl, n: (torch.tensor(1.0, device=device), parts[sl.start],
                                                                     ro["batch"]["labels"][sl]))
    whole = {"labels": torch.tensor([[1, 2, -100], [3, -100, -100], [4, -100, -100], [-100, -100, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]])}
    whole["input_ids"] = whole["attention_mask"] * 7
    ro = {"batch": whole,
          "scores": [Reward(reward=r, accuracy=r, format=1.0, extracted=None) for r in (1.0, 0.0, 0.0, 1.0)],
          "truncated": torch.tensor([1.0, 0.0, 0.0, 0.0]), "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0]),
          "penalty": torch.tensor([-0.5, 0.0, 0.0, 0.0]),
          "rows": [{"parts": {"iou": v}} for v in (0.5, None, 1.0, None)],  # a function that scored two samples
          "info": {"sampling_rounds": 2.0}}  # dynamic sampling's, for the rollout
    for aggregation, pg in (("token-mean", 1.5), ("seq-mean-token-mean", 2.0)):
        ctx = SimpleNamespace(stage=SimpleNamespace(loss_type=None, aggregation=aggregation), extra={},
                              model=torch.nn.Linear(1, 1, device=device))
        steps = list(G._grpo_update(ctx, ro, slice(0, 4), [slice(0, 2), slice(2, 4)]))
        assert [m is None for _, m in steps] == [True, False]
        m = steps[-1][1]
        assert m["entropy"].device.type == device
        weights = ctx.extra["metric_weights"]
        assert weights["entropy"] == 4 and weights["reward/iou"] == 2  # the update's tokens; the samples scored
        assert ("pg_loss" in weights) == (aggregation == "token-mean")  # else a mean over rows
        if device == "cpu":
            assert m["entropy"].item() == pytest.approx(1.5) and m["pg_loss"].item() == pytest.approx(pg)
            assert (m["ratio_min"].item(), m["ratio_max"].item()) == pytest.approx((0.7, 1.1))
            assert m["reward"].item() == 0.5 and m["response_tokens"].item() == 1.0 and m["truncated"].item() == 0.25
            assert m["rank_tokens"].item() == m["rank_tokens_max"].item() == 8  # real tokens, prompts included
            assert m["overlong_penalty"].item() == -0.125
            assert m["reward/iou"].item() == 0.75  # the mean over the samples it scored
            assert m["sampling_rounds"].item() == 2.0
            share = 1.0 if aggregation == "token-mean" else 0.5  # a per-sequence mean: each half's share
            assert [sh.item() for sh, _ in steps] == [share, share]


def test_epochs_per_rollout_pass_over_each_rollout_again(tmp_path, monkeypatch):
    """epochs_per_rollout 2 with updates_per_rollout 2: one rollout serves 4 updates, its minibatches in order twice,
    as TRL's num_iterations does (`_buffered_inputs[self._step % steps_per_generation]`, a new generation every
    steps_per_generation x num_iterations steps); only the first update is on-policy, and the second pass sees
    the first pass's samples again."""
    from vlmfast.stages import grpo as G

    rollouts = []
    real = G._rollout
    monkeypatch.setattr(G, "_rollout", lambda ctx, index: rollouts.append(index) or real(ctx, index))
    grpo = {"type": "grpo", "name": "grpo", "steps": 4, "lr": 2e-3, "batch_size": 2, "group_size": 4,
            "max_new_tokens": 6, "updates_per_rollout": 2, "epochs_per_rollout": 2,
            "entropy_coef": 0.05}  # every update moves the policy, whatever the (tiny model's) rewards
    run(recipe(tmp_path, [grpo], eval={"at_start": False, "probes": 0}))
    recs = records(tmp_path)
    assert rollouts == [0] and [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["ratio_min"] == recs[0]["ratio_max"] == 1.0
    assert all(r["ratio_min"] != 1.0 or r["ratio_max"] != 1.0 for r in recs[1:])
    for first, again in ((recs[0], recs[2]), (recs[1], recs[3])):  # the same minibatch, one pass later
        assert (again["reward"], again["response_tokens"]) == (first["reward"], first["response_tokens"])
