"""Paired bootstrap over image indices: intervals for a metric of one sample set and for the difference between two
sets made on the same keys (image i of both from the key (seed, i)); Holm's adjustment for a family of comparisons.

A replicate draws n image indices with replacement; both sets are evaluated on the *same* indices, and set-level
metrics (Fréchet distances) are recomputed on the replicate's images, so an interval carries the sampling noise of
the images themselves. Pairing removes the noise the two sets share (the same labels and keys), which is what makes
small method differences measurable.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate (on all images) with its percentile bootstrap interval; `p` is the two-sided bootstrap
    p-value of a difference (None for a single set's metric)."""
    estimate: float
    low: float
    high: float
    p: Optional[float] = None

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def replicate_indices(n: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """[replicates, n] indices drawn with replacement; the same rows serve every set of a comparison."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 images, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _check(data: Sequence[np.ndarray], n: int):
    for a in data:
        if np.shape(a)[0] != n:
            raise ValueError(f"every array of a paired set needs {n} rows (one per image), got shape {np.shape(a)}")


def _percentiles(values: np.ndarray, level: float):
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def interval(metric: Callable, data: Sequence[np.ndarray], indices: np.ndarray, level: float = LEVEL) -> Interval:
    """metric(*arrays) on all images and its interval over the replicates (`data`: arrays with one row per image)."""
    _check(data, indices.shape[1])
    values = np.array([metric(*(a[idx] for a in data)) for idx in indices])
    return Interval(float(metric(*data)), *_percentiles(values, level))


def difference(metric: Callable, a: Sequence[np.ndarray], b: Sequence[np.ndarray], indices: np.ndarray,
               level: float = LEVEL) -> Interval:
    """metric(b) − metric(a), both evaluated on the same indices in every replicate; p = 2·min(P(d ≤ 0), P(d ≥ 0))
    with the bootstrap's +1 correction (never exactly 0)."""
    _check(a, indices.shape[1])
    _check(b, indices.shape[1])
    d = np.array([metric(*(x[idx] for x in b)) - metric(*(x[idx] for x in a)) for idx in indices])
    r = len(d)
    p = min(1.0, 2 * min((np.sum(d <= 0) + 1) / (r + 1), (np.sum(d >= 0) + 1) / (r + 1)))
    return Interval(float(metric(*b) - metric(*a)), *_percentiles(d, level), p=float(p))


def holm(pvalues: Sequence[float]) -> list:
    """Holm–Bonferroni adjusted p-values (same order as given): control the family-wise error of m comparisons."""
    p = np.asarray(pvalues, np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


# --- metrics of one replicate --------------------------------------------------------------------------------------
def accuracy(correct: np.ndarray) -> float:
    return float(np.mean(correct))


def _stats(x: np.ndarray):
    x = np.asarray(x, np.float64)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet(mu1, s1, mu2, s2) -> float:
    """‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), the trace from the eigenvalues of Σ₁Σ₂ (real, ≥ 0 for PSD
    covariances; clipped where rounding makes them slightly negative) — `metrics.frechet_distance` without sqrtm,
    fast enough for thousands of replicates."""
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig.real, 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fd_to(reference: np.ndarray) -> Callable:
    """metric(features) = the Fréchet distance to a fixed reference set (real images: not resampled)."""
    mu_r, s_r = _stats(reference)
    return lambda features: frechet(*_stats(features), mu_r, s_r)


def fd_between(features: np.ndarray, other: np.ndarray) -> float:
    """The Fréchet distance between two sets resampled together (e.g. a model's and the FP model's images of the
    same keys: 'FD to FP')."""
    return frechet(*_stats(features), *_stats(other))


def verdict(name: str, d: Interval, lower_is_better: bool, adjusted_p: Optional[float] = None) -> str:
    """One finding: the difference with its interval, and 'better'/'worse' only where the interval excludes 0."""
    p = d.p if adjusted_p is None else adjusted_p
    text = f"{name} {d.estimate:+.4g} [{d.low:+.4g}, {d.high:+.4g}]" + ("" if p is None else f" (p {p:.3g})")
    if not d.excludes_zero or (adjusted_p is not None and adjusted_p >= 1 - LEVEL):
        return text + ": no measurable difference"
    return text + (": better" if (d.estimate < 0) == lower_is_better else ": worse")
