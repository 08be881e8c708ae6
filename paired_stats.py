"""Paired differences of two arms' 0/1 outcomes over (seeds, questions): a bootstrap over seeds and questions, a t
interval over the per-seed means, their p-values, Holm's correction over a family of pairs and the verdict each
pair earns. Pure functions of arrays (numpy and math only: no scipy), called directly by the tests; the evidence
report (evidence_report.py) applies them to a run's pairs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CLAIM_ALPHA = 0.05  # familywise error rate of the verdicts


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), converging fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300  # keeps a denominator off zero without changing the value
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges on one side of the mean; the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) covers the other
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom; computed directly (not as 1 - cdf) so that
    small p-values keep their digits."""
    if math.isinf(t):
        return 0.0
    return min(1.0, regularized_beta(df / (df + t * t), df / 2.0, 0.5))


def t_cdf(t: float, df: float) -> float:
    tail = t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df (> 0, not necessarily whole) degrees of freedom, by bisection on t_cdf."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:  # one degree of freedom has heavy tails: the bracket may need to grow a lot
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2.0


def t_interval(values: np.ndarray, level: float) -> tuple[float, float, float, float]:
    """One-sample t: mean, the level interval mean +- t_{(1+level)/2, n-1} sd/sqrt(n), and the two-sided p of
    mean = 0. One value carries no information about its spread: (-inf, +inf) and p = 1."""
    values = np.asarray(values, dtype=float)
    mean, n = float(values.mean()), len(values)
    if n < 2:
        return mean, -math.inf, math.inf, 1.0
    standard_error = float(values.std(ddof=1)) / math.sqrt(n)
    if standard_error == 0.0:  # every seed moved by the same amount: a point, significant unless that amount is 0
        return mean, mean, mean, 1.0 if mean == 0.0 else 0.0
    half_width = t_quantile((1.0 + level) / 2.0, n - 1) * standard_error
    return mean, mean - half_width, mean + half_width, t_two_sided_p(mean / standard_error, n - 1)


def seed_differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-seed accuracy difference of two (seeds, questions) 0/1 grids, paired by seed and question."""
    return (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean(axis=1)


def seed_t_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean difference, its level t interval and two-sided p over the per-seed differences (n - 1 df): the
    seeds are the independent replicates of training, so this is the interval that trusts the questions least."""
    return t_interval(seed_differences(a, b), level)


def paired_bootstrap_means(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """Mean of a - b over each of `resamples` resampled (seeds, questions) grids: seeds and questions each drawn
    with replacement, paired (the same draw for both arms)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    n_seeds, n_questions = diff.shape
    seeds = rng.integers(0, n_seeds, (resamples, n_seeds))
    questions = rng.integers(0, n_questions, (resamples, n_questions))
    # mean over the resampled grid = mean over resampled seeds of each seed's mean over resampled questions
    per_seed = np.stack([diff[:, q].mean(1) for q in questions])          # (resamples, n_seeds)
    return np.take_along_axis(per_seed, seeds, 1).mean(1)


def bootstrap_interval(means: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of the resampled means at `level`."""
    tail = round(50.0 * (1.0 - level), 10)  # rounded so that 0.95 reads exactly [2.5, 97.5] as it always has
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_p(means: np.ndarray) -> float:
    """Two-sided p of "no difference" from the same resamples as the interval: twice the smaller share on
    either side of 0, never below one resample's worth (fewer resamples cannot show more) and at most 1."""
    means = np.asarray(means)
    at_most, at_least = float(np.mean(means <= 0.0)), float(np.mean(means >= 0.0))
    return min(1.0, max(1.0 / len(means), 2.0 * min(at_most, at_least)))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over a (seeds, questions) grid of 0/1 outcomes, and a `level` percentile interval that
    resamples seeds and questions (each with replacement, paired: the same draw for both arms)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    low, high = bootstrap_interval(paired_bootstrap_means(a, b, resamples, seed), level)
    return float(diff.mean()), low, high


def holm(pvalues: list[float], alpha: float = CLAIM_ALPHA) -> tuple[list[float], list[float]]:
    """Holm's step-down correction over m tests: the adjusted p-values (monotone in the raw ones, at most 1), and
    per test the level of its adjusted interval, 1 - alpha / (m - i + 1) for the i-th smallest p (1-based)."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted, levels = np.empty(m), np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)  # step-down: a test is rejected only after every smaller one
    levels[order] = 1.0 - alpha / (m - np.arange(m))
    return adjusted.tolist(), levels.tolist()


@dataclass(frozen=True)
class PairStatistics:
    """What one pair's intervals are read from, at any level."""
    diff: float                      # a - b over the whole grid
    seed_differences: np.ndarray     # one per seed: the t interval's sample
    bootstrap_means: np.ndarray      # the resampled grid means: the bootstrap interval's and p's sample


def pair_statistics(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> PairStatistics:
    """a, b: (seeds, questions) 0/1 grids of two arms, paired by seed and question."""
    diff = float((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())
    return PairStatistics(diff, seed_differences(a, b), paired_bootstrap_means(a, b, resamples, seed))


def _bound(x: float) -> float | None:
    """JSON has no infinity: an unbounded side is stored as null."""
    return x if math.isfinite(x) else None


def unbound(x: float | None, side: float) -> float:
    return side * math.inf if x is None else x


def claims(pairs: list[PairStatistics], alpha: float = CLAIM_ALPHA) -> list[dict]:
    """Per pair, the numbers results.json keeps: 95% bootstrap and seed-t intervals, both p-values, the claim p
    (the larger), Holm's adjusted p over these pairs, both intervals at the pair's Holm level, the claim interval
    (the hull of those two: at least as wide as the wider) and the verdict. Unbounded sides are null."""
    out = []
    for stats in pairs:
        low, high = bootstrap_interval(stats.bootstrap_means, 0.95)
        _, seed_low, seed_high, t_p = t_interval(stats.seed_differences, 0.95)
        boot_p = bootstrap_p(stats.bootstrap_means)
        out.append({"diff": stats.diff, "low": low, "high": high, "seed_low": seed_low, "seed_high": seed_high,
                    "bootstrap_p": boot_p, "t_p": t_p, "claim_p": max(boot_p, t_p)})
    adjusted, levels = holm([row["claim_p"] for row in out], alpha)
    for stats, row, holm_p, level in zip(pairs, out, adjusted, levels):
        adj_low, adj_high = bootstrap_interval(stats.bootstrap_means, level)
        _, adj_seed_low, adj_seed_high, _ = t_interval(stats.seed_differences, level)
        claim_low, claim_high = min(adj_low, adj_seed_low), max(adj_high, adj_seed_high)
        excludes_zero = claim_low > 0.0 or claim_high < 0.0
        verdict = "not shown"
        if holm_p < alpha and excludes_zero:
            verdict = "supported (+)" if row["diff"] > 0 else "supported (-)"
        row.update(holm_p=holm_p, adjusted_level=level, adjusted_low=adj_low, adjusted_high=adj_high,
                   adjusted_seed_low=adj_seed_low, adjusted_seed_high=adj_seed_high,
                   claim_low=claim_low, claim_high=claim_high, verdict=verdict)
        for key in ("seed_low", "adjusted_seed_low", "claim_low", "seed_high", "adjusted_seed_high", "claim_high"):
            row[key] = _bound(row[key])
    return out
