"""The statistics behind the study's verdicts: the mean's t-interval over seeds, a claim's two-sided p-value, and
Holm's step-down rule over the study's claims (five claims tested at 5% each would show one false verdict in about
23% of studies where nothing is true; Holm keeps that below 5%). No scipy: Student's t from the regularized incomplete
beta function (Numerical Recipes' continued fraction), checked against the quantile table below."""

from __future__ import annotations

import math

ALPHA = 0.05  # the family-wise error rate of a study's verdicts

# two-sided 95% Student-t quantiles by degrees of freedom, 1-30 (beyond: t95's expansion)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
Z975 = 1.959963984540054
def t95(df: int) -> float:
    """The two-sided 95% Student-t quantile: the table to 30 degrees of freedom, then the Cornish-Fisher expansion
    in 1/df (Abramowitz & Stegun 26.7.5; within 1e-4 there). A larger df's value for a missing one, or 1.96,
    would narrow every interval."""
    if df <= 0:
        return float("inf")
    if df in T95:
        return T95[df]
    z = Z975
    g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, low, high, sd) of values over seeds: the mean's 95% t-interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, -math.inf, math.inf, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd


def verdict(values: list[float], threshold: float = 0.0, side: str = ">") -> str:
    """holds / contradicted / inside the noise, for the claim "mean d {side} threshold"."""
    _, lo, hi, _ = interval(values)
    above, below = lo > threshold, hi < threshold
    if side == ">":
        return "holds" if above else ("contradicted" if below else "inside the noise")
    return "holds" if below else ("contradicted" if above else "inside the noise")


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_x(df/2, 1/2) / 2 at x = df / (df + t^2), t >= 0."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny, c, d = 1e-300, 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * f / a


def two_sided_p(values: list[float], threshold: float = 0.0) -> float:
    """The paired t-test's two-sided p-value of "mean d = threshold" over seeds (1 with fewer than two seeds)."""
    n = len(values)
    if n < 2:
        return 1.0
    mean, _, _, sd = interval(values)
    scale = 1e-12 * max(1.0, abs(mean), abs(threshold))  # equal values: sd is rounding, not spread
    if sd <= scale:
        return 1.0 if abs(mean - threshold) <= scale else 0.0
    t = (mean - threshold) / (sd / math.sqrt(n))
    return min(1.0, 2 * (1 - t_cdf(abs(t), n - 1)))


def family_verdicts(claims: list[dict]) -> list[str | None]:
    """Each claim's verdict with Holm's step-down rule at ALPHA over the claims measured: the k-th smallest p-value
    decides against ALPHA / (m - k + 1) until one fails; a decided claim *holds* on its side of the threshold and is
    *contradicted* on the other; the rest are *inside the noise*; None for a claim with no values. With one claim
    this is `verdict`."""
    ps = {i: two_sided_p(list(c["values"].values()), c["threshold"]) for i, c in enumerate(claims) if c["values"]}
    out = [None if not c["values"] else "inside the noise" for c in claims]
    m = len(ps)
    for k, i in enumerate(sorted(ps, key=ps.get)):
        if ps[i] > ALPHA / (m - k):
            break
        c = claims[i]
        mean = interval(list(c["values"].values()))[0]
        above = mean > c["threshold"]
        out[i] = "holds" if above == (c["side"] == ">") else "contradicted"
    return out
