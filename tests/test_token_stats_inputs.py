"""Bad input fails before any compute with an error that names the problem."""

import pytest
import torch

from vlmfast import token_stats, token_stats_from_logits

N, H, V = 6, 8, 50


def ok():
    return dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), target=torch.randint(0, V, (N,)))


def call(**over):
    args = ok()
    args.update(over)
    return token_stats(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(weight=torch.randn(V, H + 1)), ValueError, "hidden size mismatch"),
        (dict(target=torch.randint(0, V, (N + 1,))), ValueError, "target shape"),
        (dict(target=torch.rand(N)), TypeError, "integer"),
        (dict(target=torch.tensor([0, 1, 2, V, 4, 5])), ValueError, f"id {V} outside"),
        (dict(target=torch.tensor([0, 1, 2, -3, 4, 5])), ValueError, "id -3 outside"),
        (dict(hidden=torch.randn(N, H).int()), TypeError, "hidden must be float"),
        (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(hidden=torch.randn(H)), ValueError, "hidden must have"),
        (dict(bias=torch.randn(V + 2)), ValueError, "bias has"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(ignore_index=3), ValueError, "ignore_index=3 is a real token"),
        (dict(kl="sideways", teacher=torch.randn(N, V)), ValueError, "kl must be one of"),
        (dict(kl="reverse"), ValueError, "needs a teacher"),
        (dict(teacher=torch.randn(N, V)), ValueError, "kl=None"),
        (dict(outputs=("logp", "perplexity")), ValueError, "unknown outputs"),
        (dict(outputs=("kl",)), ValueError, "output 'kl' requested"),
        (dict(teacher=(torch.randn(N, 4), torch.randn(V + 1, 4)), kl="reverse"), ValueError, "vocabulary mismatch"),
        (dict(teacher=torch.randn(N, V + 1), kl="forward"), ValueError, "teacher logits shape"),
        (dict(teacher=(torch.randn(N + 1, 4), torch.randn(V, 4)), kl="reverse"), ValueError, "teacher hidden shape"),
        (dict(teacher=(torch.randn(N, 4),), kl="reverse"), TypeError, "teacher must be"),
        (dict(teacher=(torch.randn(N, 4, dtype=torch.float64), torch.randn(V, 4, dtype=torch.float64)),
              kl="reverse"), TypeError, "teacher dtype torch.float64 differs from the student's torch.float32"),
        (dict(backend="cuda-magic"), ValueError, "unknown backend"),
        (dict(per_sequence=True), ValueError, r"\[B, T\]"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "end at the token count 6"),
        (dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "never decrease"),
    ],
)
def test_bad_input_raises_clear_error(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_nan_in_hidden_is_named():
    h = torch.randn(N, H)
    h[2, 3] = float("nan")
    with pytest.raises(ValueError, match="hidden contains NaN"):
        call(hidden=h)
    t = torch.randn(N, V)
    t[0, 0] = float("-inf")  # a masked column: allowed (ops/floor.py)
    call(teacher=t, kl="reverse")
    t[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"teacher logits contains NaN or \+inf"):
        call(teacher=t, kl="reverse")


@pytest.mark.parametrize("row", [0, N // 2, N - 1])
def test_nan_is_found_in_any_slice_of_the_finite_check(row, monkeypatch):
    """The check reads inputs in slices of FINITE_CHECK_ELEMS (bounded temporaries at a 7B head): a NaN in the
    first, a middle or the last slice is named; a clean input passes."""
    from vlmfast.ops import _inputs

    monkeypatch.setattr(_inputs, "FINITE_CHECK_ELEMS", 2 * V)  # slices of 2 rows of the teacher logits
    t = torch.randn(N, V)
    call(teacher=t.clone(), kl="reverse")
    t[row, V - 1] = float("nan")
    with pytest.raises(ValueError, match=r"teacher logits contains NaN or \+inf"):
        call(teacher=t, kl="reverse")


def test_checks_can_be_skipped_on_a_hot_path():
    """check_inputs=False skips the value checks (the only host syncs), not the shape checks."""
    h = torch.randn(N, H)
    h[0, 0] = float("nan")
    r = call(hidden=h, check_inputs=False)
    assert torch.isnan(r.logp[0])
    with pytest.raises(ValueError, match="hidden size mismatch"):
        call(weight=torch.randn(V, H + 1), check_inputs=False)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        call(backend="triton")


def test_from_logits_errors():
    with pytest.raises(ValueError, match="target shape"):
        token_stats_from_logits(torch.randn(N, V), torch.randint(0, V, (N + 1,)))
    with pytest.raises(ValueError, match="no triton kernel"):
        token_stats_from_logits(torch.randn(N, V), torch.randint(0, V, (N,)), backend="triton")
    with pytest.raises(ValueError, match="takes the teacher as logits"):
        token_stats_from_logits(torch.randn(N, V), torch.randint(0, V, (N,)),
                                teacher=(torch.randn(N, 3), torch.randn(V, 3)), kl="reverse")


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        call(weight=torch.randn(V, H, device="meta"))
    with pytest.raises(ValueError, match="target is on meta"):
        call(target=torch.randint(0, V, (N,), device="meta"))
    with pytest.raises(ValueError, match="teacher hidden is on meta"):
        call(teacher=(torch.randn(N, 4, device="meta"), torch.randn(V, 4)), kl="reverse")


def test_env_switch_turns_value_checks_off(monkeypatch):
    h = torch.randn(N, H)
    h[0, 0] = float("nan")
    monkeypatch.setenv("VLMFAST_CHECK_INPUTS", "0")
    assert torch.isnan(call(hidden=h).logp[0])
    monkeypatch.setenv("VLMFAST_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match="NaN"):
        call(hidden=h)


@pytest.mark.parametrize("op", ["token_stats", "token_loss"])
def test_a_second_derivative_is_refused_not_silently_wrong(op):
    """backward(create_graph=True) through a fused op (a gradient penalty): its gradient is computed, not traced, so
    the penalty's gradient would lack the op's part. It raises instead."""
    from vlmfast.ops import token_loss, token_stats

    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (7,))
    if op == "token_stats":
        loss = token_stats(h, W, y).logp.sum()
    else:
        loss = token_loss(h, W, y, lambda s, index: -s["logp"])[0]
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)
    h2 = h.detach().requires_grad_()  # a plain backward still works
    token_stats(h2, W, y).logp.sum().backward()
    assert torch.isfinite(h2.grad).all()
