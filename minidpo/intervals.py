"""Intervals for a sweep's numbers: the spread over seeds, and the bootstrap over questions.

Two different quantities, never one column for both:

    seed spread        mean over K seeds +- t(0.975, K-1) * sd / sqrt(K): how much a rerun with
                       another DPO seed moves the number (3 seeds: t = 4.303, not 1.96)
    question bootstrap percentile interval resampling the benchmark's questions with replacement
                       (a question's turns, and its outcomes in every seed, stay together): how much
                       another draw of questions of the same kind would move it

The t quantile is computed here (no scipy at run time): the CDF integrates Student's density by
Simpson's rule, the quantile is found by bisection; tests compare it with mpmath.
"""
import functools
import math
import statistics

import numpy as np


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # Simpson on [0, x]; the density is smooth, so 4,000 intervals give ~1e-12 even at x = 60.
    t = np.linspace(0.0, x, 4001)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
    weights = np.ones_like(t)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return 0.5 + float(weights @ density) * (x / 4000) / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p (0.5 <= p < 1), by bisection on `t_cdf`."""
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile takes 0.5 <= p < 1, got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # df = 1 at p = 0.975 needs 12.7
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def seed_spread(values, level: float = 0.95) -> dict:
    """`{"mean", "sd", "seeds", "t", "interval"}` of per-seed values; with one seed there is no
    spread to measure: sd, t and interval are None."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_spread: no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "sd": None, "seeds": 1, "t": None, "interval": None}
    sd = statistics.stdev(values)
    t = t_quantile(0.5 + level / 2, len(values) - 1)
    half = t * sd / math.sqrt(len(values))
    return {"mean": mean, "sd": sd, "seeds": len(values), "t": t, "interval": [mean - half, mean + half]}


def question_bootstrap(per_question, statistic, *, seed: int = 0, samples: int = 2000,
                       level: float = 0.95):
    """Percentile interval of `statistic(column sums)` over `samples` resamples of the rows of
    `per_question` (one row a question, float/int array [Q, C]); None when there are no rows.
    Resamples where the statistic is undefined (NaN) are left out."""
    counts = np.asarray(per_question, dtype=np.float64)
    if counts.ndim != 2 or len(counts) == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(counts), size=(samples, len(counts)))
    sums = counts[draws].sum(axis=1)  # [samples, C]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.array([statistic(row) for row in sums], dtype=np.float64)
    if np.isnan(values).all():
        return None
    tails = [50 * (1 - level), 50 * (1 + level)]
    return [float(x) for x in np.nanpercentile(values, tails)]


def win_rate(counts) -> float:
    """W / (W + T + L) of counts (wins, ties, losses, errors)."""
    w, t, l = counts[0], counts[1], counts[2]
    return w / (w + t + l) if w + t + l else math.nan


def net_win(counts) -> float:
    """(W - L) / (W + T + L): the share of decided question-turns won minus the share lost."""
    w, t, l = counts[0], counts[1], counts[2]
    return (w - l) / (w + t + l) if w + t + l else math.nan


def accuracy(counts) -> float:
    """right / graded of counts (right, graded)."""
    return counts[0] / counts[1] if counts[1] else math.nan
