"""Intervals clustered by person: every statistic the learning checks and the evaluation report is a mean over
people, with a 95 % percentile-bootstrap interval that resamples people, not images.

Why by person: two images (or two noise draws, or two target motions) of one person share that person's
difficulty, so treating them as independent makes the interval too narrow; the unit that generalises is the
person. Each person counts once (the mean of their values), so a person with more images does not weigh more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean over people and its percentile-bootstrap interval (``people``: N, the number of clusters)."""

    mean: float
    low: float
    high: float
    people: int
    values: int  # observations behind the means (images x draws)
    level: float = 0.95

    def excludes(self, value: float = 0.0) -> bool:
        """The interval lies entirely above ``value`` (strictly): the effect is there at this level."""
        return self.people > 1 and self.low > value

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def person_means(values: Sequence[float], people: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """-> (sorted person labels, the mean of each person's values)."""
    v = np.asarray(values, dtype=np.float64)
    labels, inverse = np.unique(np.asarray([str(p) for p in people]), return_inverse=True)
    if v.shape != inverse.shape:
        raise ValueError(f"{v.shape[0]} values but {inverse.shape[0]} person labels")
    return labels, np.bincount(inverse, weights=v) / np.bincount(inverse)


def clustered_interval(values: Sequence[float], people: Sequence[object], *, level: float = 0.95,
                       resamples: int = 4000, seed: int = 0) -> Interval:
    """Mean of per-person means, with the bootstrap interval that draws people with replacement.

    One person gives a degenerate interval (low = high = mean) that ``excludes`` never accepts; NaN values are
    an error (a metric that could not be measured must be scored, e.g. a missed face as 0, before it gets here).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to summarise")
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite: score what could not be measured before summarising")
    _, means = person_means(v, people)
    n = len(means)
    mean = float(means.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1, int(v.size), level)
    rng = np.random.default_rng(seed)
    draws = means[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(mean, float(low), float(high), n, int(v.size), level)
