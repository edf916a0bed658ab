"""The study's verdicts across seeds: the t-interval is the textbook one, the three verdicts follow the
interval's side of the threshold, each claim's per-seed statistic comes from that seed's numbers only, and a
Stage-2 run is flat only when its last quarter does not move."""

import math

import numpy as np
import pytest

from vlmfast.study_stats import family_verdicts, t_cdf, two_sided_p
from vlmfast.study_verdicts import claims, interval, plateau, plateau_noise, t95, verdict


def test_interval_is_the_student_t_interval():
    mean, lo, hi, sd = interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n), sd = 1
    assert mean == 2.0 and sd == pytest.approx(1.0)
    assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-3)
    assert interval([0.5]) == (0.5, -math.inf, math.inf, pytest.approx(float("nan"), nan_ok=True))


@pytest.mark.parametrize("values, threshold, side, want", [
    ([0.10, 0.12, 0.11], 0.0, ">", "holds"),
    ([-0.10, -0.12, -0.11], 0.0, ">", "contradicted"),
    ([-0.10, 0.10, 0.05], 0.0, ">", "inside the noise"),
    ([0.02, 0.03, 0.04], 0.10, "<", "holds"),  # a spread below the band
    ([0.30, 0.32, 0.31], 0.10, "<", "contradicted"),
    ([0.30], 0.0, ">", "inside the noise"),  # one seed can never decide
])
def test_verdicts_follow_the_interval(values, threshold, side, want):
    assert verdict(values, threshold, side) == want


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 30])
def test_t_cdf_gives_the_tables_two_sided_5_percent_and_closed_forms(df):
    from vlmfast.study_stats import T95

    assert 2 * (1 - t_cdf(T95[df], df)) == pytest.approx(0.05, abs=2e-4)  # the quantile table, three decimals
    assert t_cdf(0.0, df) == pytest.approx(0.5) and t_cdf(-1.3, df) == pytest.approx(1 - t_cdf(1.3, df))
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(t)/pi
    assert t_cdf(1.0, 2) == pytest.approx(0.5 + 1.0 / (2 * math.sqrt(3.0)))  # df 2: 1/2 + t / (2 sqrt(2 + t^2))


def test_p_value_is_the_paired_t_tests():
    # [1, 2, 3] against 0: t = 2 / (1 / sqrt 3) = 3.464 at df 2; two-sided p = 1 - t / sqrt(2 + t^2) (df 2 closed form)
    t = 2 * math.sqrt(3)
    assert two_sided_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert two_sided_p([0.3]) == 1.0 and two_sided_p([0.2, 0.2, 0.2], 0.2) == 1.0


def _claim(p_target, side=">", n=4):
    """A claim whose values give two-sided p = p_target against 0 (values spread as +-1 around their mean)."""
    lo, hi = 0.0, 50.0
    for _ in range(200):  # the t giving p_target at df n - 1
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 2 * (1 - t_cdf(mid, n - 1)) > p_target else (lo, mid)
    sd = float(np.std([1, -1, 1, -1], ddof=1))
    mean = lo * sd / math.sqrt(n)
    return {"values": {i: mean + d for i, d in enumerate([1, -1, 1, -1])}, "threshold": 0.0, "side": side}


def test_holm_decides_the_claims_together():
    # two claims at p = 0.03: each alone would hold; together the smaller must pass 0.05 / 2
    assert [verdict(list(_claim(0.03)["values"].values()), 0.0, ">")] == ["holds"]
    assert family_verdicts([_claim(0.03), _claim(0.03)]) == ["inside the noise", "inside the noise"]
    # p = 0.01 passes 0.025; then 0.04 passes 0.05: both decided, on their sides
    assert family_verdicts([_claim(0.04, "<"), _claim(0.01)]) == ["contradicted", "holds"]
    # a step-down stops at the first failure: 0.01 passes 0.05 / 3, 0.03 fails 0.025, so 0.04 is not decided either
    assert family_verdicts([_claim(0.04), _claim(0.01), _claim(0.03)]) == ["inside the noise", "holds",
                                                                          "inside the noise"]
    assert family_verdicts([{"values": {}, "threshold": 0.0, "side": ">"}]) == [None]


def _seed(early_ood, over_ood, accs, h_opd, cw=(0.6, 0.5), dpo=(0.6, 0.3)):
    ev = {a: {"val/accuracy": acc, "ood/accuracy": 0.2, "val/entropy": 0.3, "val/pass@4": 0.5}
          for a, acc in zip(("sft_early", "sft_over", "opd", "sft_gentle"), accs)}
    ev["sft_early"]["ood/accuracy"], ev["sft_over"]["ood/accuracy"] = early_ood, over_ood
    ev["opd"]["val/entropy"] = h_opd
    for arm, (before, after) in (("sft_gentle → cw_dpo", cw), ("sft_gentle → dpo", dpo)):
        ev[arm] = {"val/accuracy": after, "_before": {"val/accuracy": before}, "_run": None}
    for k, (b, a) in {"sft_early → grpo": (0.3, 0.6), "opd → grpo": (0.7, 0.62)}.items():
        ev[k] = {"val/pass@4": a, "_before": {"val/pass@4": b}, "_run": None}
    return ev


def test_each_claim_is_computed_per_seed_from_that_seeds_runs():
    per_seed = {0: _seed(0.30, 0.20, (0.5, 0.6, 0.55, 0.52), 0.40),
                7: _seed(0.25, 0.22, (0.5, 0.8, 0.55, 0.52), 0.20, cw=(0.6, 0.55))}
    got = {c["key"]: c["values"] for c in claims(per_seed)}
    assert got["narrow_band"] == {0: pytest.approx(0.10), 7: pytest.approx(0.30)}  # max - min of four accuracies
    assert got["opd_entropy"] == {0: pytest.approx(0.10), 7: pytest.approx(-0.10)}  # minus the higher SFT entropy
    assert got["pass_gone"] == {0: pytest.approx(0.40 - 0.02), 7: pytest.approx(0.40 - 0.02)}  # spread before - after
    assert got["early_ood"] == {0: pytest.approx(0.10), 7: pytest.approx(0.03)}
    assert got["cooling_stable"] == {0: pytest.approx(-0.1 + 0.3), 7: pytest.approx(-0.05 + 0.3)}


def test_plateau_reads_the_last_quarter():
    def run(rewards, accs):
        recs = [{"kind": "train", "stage": "grpo", "step": s, "reward": r} for s, r in enumerate(rewards, 1)]
        recs += [{"kind": "eval", "stage": "grpo", "step": s, "val/accuracy": a} for s, a in accs]
        return {"records": recs}

    flat = run([0.2] * 20 + [0.6] * 20 + [0.6] * 40, [(20, 0.3), (40, 0.5), (60, 0.52), (80, 0.5)])
    assert plateau(flat, "reward", 80) == pytest.approx(0.0)
    x, y = [40, 60, 80], [0.5, 0.52, 0.5]  # the second half's evaluations; numpy's fit as the reference
    assert plateau(flat, "val/accuracy", 80) == pytest.approx(np.polyfit(x, y, 1)[0] * 20, abs=1e-12)
    assert plateau(flat, "val/accuracy", 80) == pytest.approx(0.0, abs=1e-12)  # symmetric: no trend
    rising = run([0.1 * (s // 10) for s in range(80)], [(40, 0.3), (60, 0.4), (70, 0.5), (80, 0.6)])
    assert plateau(rising, "reward", 80) > 0.15
    slope = np.polyfit([40, 60, 70, 80], [0.3, 0.4, 0.5, 0.6], 1)[0]
    assert plateau(rising, "val/accuracy", 80) == pytest.approx(slope * 20)
    assert plateau(run([0.1] * 80, [(40, 0.4), (80, 0.5)]), "val/accuracy", 80) is None  # two evaluations: unknown
    # DPO evaluated every 5 of 40: one low evaluation (step 30) moves the trend a fraction of its dip, while
    # the last-minus-earlier difference would read the whole dip
    wobble = run([0.1] * 40, [(s, 0.86) for s in range(0, 45, 5) if s != 30] + [(30, 0.76)])
    assert abs(plateau(wobble, "val/accuracy", 40)) < 0.02
    falling = run([0.1] * 40, [(s, 0.86 - 0.006 * max(0, s - 20)) for s in range(0, 45, 5)])
    assert plateau(falling, "val/accuracy", 40) == pytest.approx(-0.06)  # 0.006 per step for 10 steps


def test_plateau_noise_is_two_standard_errors_of_the_quarter_means():
    """Quarters of 4 steps each (16-step run): q3 = steps 9-12, q4 = steps 13-16; the textbook Welch standard
    error of a difference of means, sqrt(s3^2/n3 + s4^2/n4), computed by hand."""
    rewards = [0.0] * 8 + [0.5, 0.7, 0.5, 0.7] + [0.6, 1.0, 0.6, 1.0]
    run = {"records": [{"kind": "train", "stage": "grpo", "step": s, "reward": r} for s, r in enumerate(rewards, 1)]}
    s3, s4 = 0.1 * 0.1 * 4 / 3, 0.2 * 0.2 * 4 / 3  # sample variances: deviations of +-0.1 and +-0.2
    assert plateau(run, "reward", 16) == pytest.approx(0.8 - 0.6)
    assert plateau_noise(run, "reward", 16) == pytest.approx(2 * (s3 / 4 + s4 / 4) ** 0.5)
    assert plateau_noise({"records": run["records"][:13]}, "reward", 16) is None  # one value in the last quarter


# t95 for every df, against the t density integrated numerically (not a table: the code's table is what is
# checked); a quantile taken from a larger df, or 1.96 past 30, narrowed every interval
def t_tail(t: float, df: int, steps: int = 20000) -> float:
    """Two-sided tail P(|T| > t) for Student's t with df degrees of freedom: Simpson's rule on the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def f(x):
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    h = t / steps
    area = f(0) + f(t) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, steps))
    return 1 - 2 * area * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 11, 16, 23, 29, 30, 31, 45, 100, 1000])
def test_t95_is_the_two_sided_95_percent_quantile(df):
    assert t_tail(t95(df), df) == pytest.approx(0.05, abs=2e-4)


def test_the_summary_judges_a_difference_by_the_noise_of_a_difference():
    """Two models' accuracies on n problems each differ by noise of sqrt(2) x one accuracy's: on 100 problems one
    accuracy's 95% half-width at 0.5 is 0.098 and a difference's 0.139, so warm-starts 0.12 apart are inside the
    noise (one accuracy's would call them apart) and 0.16 apart beyond it."""
    from vlmfast.study_report import summary

    def run(name, acc, ood):
        rec = {"kind": "eval", "stage": name, "step": 10, "val/accuracy": acc, "ood/accuracy": ood}
        return {"name": name, "records": [rec], "stages": [name], "results": {}}

    def rows(early, over):
        return [{"model": "sft_early", "stage1": run("sft_early", early, early), "stage2": None},
                {"model": "sft_over", "stage1": run("sft_over", over, over), "stage2": None}]

    inside = summary(rows(0.50, 0.38), 100)
    assert "within a narrow band" in inside and "cannot tell them apart" in inside
    beyond = summary(rows(0.50, 0.34), 100)
    assert "NOT end within a narrow band" in beyond and "cannot tell them apart" not in beyond
