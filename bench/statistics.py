"""The statistics a leaderboard and a finding rest on, in one torch-free module: 95% t-intervals
over seeds, ranks that tie where intervals overlap, paired differences, an equivalence test
(TOST) and a permutation test of correlation. Every function takes plain numbers.

Conventions: an interval is Student's t-interval of the mean over seeds (n - 1 degrees of
freedom); with fewer than 2 values it has no width (`Interval.low` and `high` are None) and it
overlaps everything, so a single seed never separates two rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Sequence, TypeVar

from scipy import stats as _scipy_stats

LEVEL = 0.95
Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values and the two-sided `level` t-interval around it (None below 2 values)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float = LEVEL

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def overlaps(self, other: Interval) -> bool:
        if self.low is None or other.low is None or self.high is None or other.high is None:
            return True  # an interval of unknown width separates nothing
        return self.low <= other.high and other.low <= self.high

    def excludes(self, value: float) -> bool:
        return self.low is not None and self.high is not None and not (self.low <= value <= self.high)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of `values` and its two-sided Student's t-interval at `level`."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, None, None, 0, level)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, n, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion (sound near 0 and 1, unlike mean ± 2 SE)."""
    if trials == 0:
        return 0.0, 1.0
    z = float(_scipy_stats.norm.ppf(0.5 + level / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: dict[Hashable, float], b: dict[Hashable, float], level: float = LEVEL) -> Interval:
    """The t-interval of a - b over the keys (seeds) both have: a paired comparison, since one
    seed's two results share the attacked model and the evaluation images."""
    common = sorted(set(a) & set(b), key=repr)
    return t_interval([a[k] - b[k] for k in common], level)


def paired_p_value(interval: Interval) -> float:
    """Two-sided p-value of a zero mean difference, from the t-interval of paired differences
    (1.0 when it has no width: fewer than 2 pairs, and 0.0 for identical nonzero differences)."""
    if interval.low is None or interval.high is None or interval.n < 2:
        return 1.0
    half = interval.high - interval.mean
    if half == 0:
        return 0.0 if interval.mean != 0 else 1.0
    se = half / float(_scipy_stats.t.ppf(0.5 + interval.level / 2, interval.n - 1))
    return float(2 * _scipy_stats.t.sf(abs(interval.mean) / se, interval.n - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over all the comparisons)."""
    p_values = [1.0 if math.isnan(p) else p for p in p_values]  # an undefined test rejects nothing
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def tied_ranks(intervals: dict[Key, Interval], higher_is_better: bool) -> dict[Key, int]:
    """Competition ranks (1, 1, 3, ...) by mean, where two rows whose intervals overlap share a
    rank: rows are joined into groups by overlap (connected components; sorted by mean, each
    group is a run), and a group's rank is 1 + the number of rows in better groups."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(intervals, key=lambda k: (math.isnan(intervals[k].mean), sign * intervals[k].mean))
    parent = {k: k for k in order}

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            # a row without an interval (one seed, or no value) ties with nothing: it is placed by
            # its mean alone, rather than joining every row into one group
            if intervals[a].low is not None and intervals[b].low is not None and intervals[a].overlaps(intervals[b]):
                parent[root(b)] = root(a)
    ranks: dict[Key, int] = {}
    first_of_group: dict[Key, int] = {}
    for position, k in enumerate(order, start=1):
        ranks[k] = first_of_group.setdefault(root(k), position)
    return ranks


def clearly_best(intervals: dict[Key, Interval], higher_is_better: bool) -> Key | None:
    """The row with the best mean when its interval excludes every other row's, else None (so
    bold never disagrees with a shared rank)."""
    finite = {k: v for k, v in intervals.items() if not math.isnan(v.mean)}
    if len(finite) < 2:
        return None
    sign = -1.0 if higher_is_better else 1.0
    first = min(finite, key=lambda k: sign * finite[k].mean)
    return None if any(finite[first].overlaps(finite[k]) for k in finite if k != first) else first


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests (TOST) of |mean difference| < margin: `p_value` is the larger of the
    two one-sided p-values; equivalence is shown when it is below the test's level."""

    difference: float
    standard_error: float
    margin: float
    p_value: float


def equivalence_test(differences: Sequence[float], margin: float) -> Equivalence:
    """TOST on paired differences (e.g. per-image robust-accuracy differences of two models on
    the same images) against the equivalence margin +-`margin`, with the t distribution (n - 1
    degrees of freedom). Fewer images mean a larger standard error and a larger p-value: cutting
    the data cannot make two things look equivalent."""
    n = len(differences)
    if n < 2:
        return Equivalence(math.nan, math.inf, margin, 1.0)
    mean = math.fsum(differences) / n
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0:
        return Equivalence(mean, 0.0, margin, 0.0 if abs(mean) < margin else 1.0)
    lower = float(_scipy_stats.t.sf((mean + margin) / se, n - 1))  # H0: difference <= -margin
    upper = float(_scipy_stats.t.cdf((mean - margin) / se, n - 1))  # H0: difference >= +margin
    return Equivalence(mean, se, margin, max(lower, upper))


def detrended_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the first differences of two sequences along a path: how well their
    step-to-step changes agree, which two merely monotone curves do not share by construction."""
    dx = [b - a for a, b in zip(x, x[1:])]
    dy = [b - a for a, b in zip(y, y[1:])]
    return pearson(dx, dy)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def permutation_p_value(x: Sequence[float], y: Sequence[float], permutations: int = 2000, seed: int = 0) -> float:
    """One-sided permutation p-value of a positive detrended correlation between `x` and `y`:
    the share of random re-orderings of y's steps whose correlation with x's steps is at least
    the observed one (with the observed one counted, so never 0)."""
    dx = [b - a for a, b in zip(x, x[1:])]
    dy = [b - a for a, b in zip(y, y[1:])]
    observed = pearson(dx, dy)
    if math.isnan(observed):
        return 1.0
    generator = random.Random(seed)
    at_least = 1
    shuffled = list(dy)
    for _ in range(permutations):
        generator.shuffle(shuffled)
        r = pearson(dx, shuffled)
        if not math.isnan(r) and r >= observed - 1e-12:
            at_least += 1
    return at_least / (permutations + 1)
