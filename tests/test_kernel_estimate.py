"""The static GPU estimate (vlmfast/kernels/estimate.py) counts what the earlier one left out, each term re-derived
here from its stated formula and the launchers' plan: the wave tail (a grid that leaves its last wave part empty
pays for the whole wave), the epilogue serialised after the MMA, dz's and dW's HBM traffic (dW read and written
once per chunk or band), and the one pass token_loss runs (6 n H V FLOP against token_stats' 8)."""

import math

import pytest

from vlmfast.kernels import estimate as est
from vlmfast.kernels import token_stats as ts

H, V = 3584, 152064
GPU = est.H100


def test_flop_counts_are_the_paths():
    for n in (2048, 8192):
        assert est.token_stats_time(n, H, V)["flops"] == 8 * n * H * V
        assert est.token_loss_time(n, H, V)["flops"] == 6 * n * H * V


@pytest.mark.parametrize("n", [128, 2048, 8192, 65536])
def test_a_logits_pass_pays_for_its_last_wave_and_its_epilogue(n):
    fwd = est.logits_pass("fwd", n, H, V)
    bn, bv = fwd["tiles"]
    assert (bn, bv) == (128, 256)  # the sm_90 TMA forward without a teacher (docs/fused_ops.md)
    blocks = math.ceil(n / bn)
    splits = ts.forward_splits(est._meta(n, H), est._meta(V, H), None, est._target(GPU))
    programs = blocks * splits
    waves = math.ceil(programs / GPU.sms)
    assert fwd["wave_efficiency"] == pytest.approx(programs / (waves * GPU.sms))
    ideal = 2 * n * H * V / (GPU.dense_tflops * 1e12)
    assert fwd["mma"] == pytest.approx(ideal * waves * GPU.sms / programs)
    # 16 exps per SM per clock bound the epilogue (6 FMAs on 128 lanes is less), one exp a logit
    assert fwd["epilogue"] == pytest.approx(n * V / 16 / (GPU.sms * GPU.clock_ghz * 1e9))
    operands = blocks * math.ceil(V / bv) * (bn + bv) * H * 2
    assert fwd["l2"] == pytest.approx(operands / (GPU.l2_tbps * 1e12))
    assert fwd["time"] == max(fwd["mma"] + fwd["epilogue"], fwd["l2"])


def test_dz_and_dw_traffic_follow_the_chunks_and_bands():
    n = 8192
    stats = est.token_stats_time(n, H, V)["terms"]
    chunk_rows = 1024**3 // (2 * V) // 128 * 128  # 1 GiB of bf16 dz, whole 128-row tiles: 3456
    chunks = math.ceil(n / chunk_rows)
    assert chunks == 3 and stats[f"dW read-modify-write ({chunks} chunks)"] == pytest.approx(
        chunks * 2 * V * H * 4 / (GPU.hbm_tbps * 1e12))
    assert stats["dz traffic"] == pytest.approx(3 * n * V * 2 / (GPU.hbm_tbps * 1e12))
    loss = est.token_loss_time(n, H, V)["terms"]
    bands = math.ceil(n / (1024**3 // (4 * V)))  # 1 GiB of fp32 logits a band: 1765 rows
    assert bands == 5 and loss[f"dW read-modify-write ({bands} bands)"] == pytest.approx(
        bands * 2 * V * H * 4 / (GPU.hbm_tbps * 1e12))
    assert loss["logits + dz traffic"] == pytest.approx(n * V * (4 + 4 + 4 + 2 + 2 + 2) / (GPU.hbm_tbps * 1e12))


def test_the_one_pass_is_the_faster_path_and_the_report_names_its_terms():
    for n in (2048, 8192, 65536):
        assert est.token_loss_time(n, H, V)["time"] < est.token_stats_time(n, H, V)["time"]
    text = est.report(tokens=(2048,))
    assert "N=2048   token_stats fwd+bwd" in text and "wave efficiency" in text and "dW read-modify-write" in text
