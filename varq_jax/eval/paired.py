"""Paired bootstrap over image indices: intervals for a metric of one sample set and for the difference between two
sets made on the same keys (image i of both from the key (seed, i)); Holm's adjustment for a family of comparisons.

A replicate draws n image indices with replacement; both sets are evaluated on the *same* indices, and set-level
metrics (Fréchet distances) are recomputed on the replicate's images, so an interval carries the sampling noise of
the images themselves. Pairing removes the noise the two sets share (the same labels and keys), which is what makes
small method differences measurable.

Intervals are percentile intervals of the replicates with the bootstrap's own bias removed (each value shifted by
θ̂ − mean θ*): a Fréchet distance is inflated by resampling with replacement (duplicated images make the
covariances noisier), so plain percentiles can lie wholly above the estimate (the research model's noise row: FD
0.54, percentiles [0.79, 1.38]). The interval then gives the spread of the statistic *at this number of images*; it
does not remove an FD's finite-N bias, so FDs compare only at the same N (every row of a table has it, and the
noise row shows how large sampling alone makes one). For a mean (class accuracy) the shift is ~0.

A difference's p-value is the normal test on its replicates (estimate / bootstrap standard error), not the count
of replicates beyond 0: with 2,000 replicates that count cannot go below p = 0.001, and Holm's adjustment over the
~140 comparisons of a full table multiplies that floor past 0.05, so no difference could ever be called. Where the
count resolves it the two agree (a test checks); a finding also needs its percentile interval to exclude 0.
"""
import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate (on all images) with its bootstrap interval; `p` is the two-sided p-value of a
    difference from its bootstrap standard error (None for a single set's metric)."""
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


def _centred(estimate: float, values: np.ndarray) -> np.ndarray:
    """Replicates shifted so that their mean is the estimate (the bootstrap's bias removed)."""
    values = np.asarray(values, np.float64)
    return values + (estimate - values.mean()) if len(values) else values


def _bounds(values: np.ndarray, level: float, floor: Optional[float] = None, ceiling: Optional[float] = None):
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    if floor is not None:                          # a distance is ≥ 0
        lo, hi = max(lo, floor), max(hi, floor)
    if ceiling is not None:                        # an accuracy is ≤ 1 (centring can push a percentile past it)
        lo, hi = min(lo, ceiling), min(hi, ceiling)
    return float(lo), float(hi)


def _p_value(estimate: float, d: np.ndarray) -> float:
    """Two-sided p of "no difference" from the replicates' standard error (1 for a difference that is 0 in every
    replicate, 0 for a constant non-zero one)."""
    se = float(np.std(d, ddof=1))
    if se == 0.0:
        return 1.0 if estimate == 0 else 0.0
    return float(math.erfc(abs(estimate) / se / math.sqrt(2)))


def interval(metric: Callable, data: Sequence[np.ndarray], indices: np.ndarray, level: float = LEVEL) -> Interval:
    """metric(*arrays) on all images and its interval over the replicates (`data`: arrays with one row per image)."""
    _check(data, indices.shape[1])
    values = np.array([metric(*(a[idx] for a in data)) for idx in indices])
    return interval_of(metric(*data), values, level)


def difference(metric: Callable, a: Sequence[np.ndarray], b: Sequence[np.ndarray], indices: np.ndarray,
               level: float = LEVEL) -> Interval:
    """metric(b) − metric(a), both evaluated on the same indices in every replicate, with its p-value."""
    _check(a, indices.shape[1])
    _check(b, indices.shape[1])
    vb = np.array([metric(*(x[idx] for x in b)) for idx in indices])
    va = np.array([metric(*(x[idx] for x in a)) for idx in indices])
    return difference_of(metric(*a), va, metric(*b), vb, level)


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


# --- many sets at once: per-replicate values, shared by every comparison ------------------------------------------
def interval_of(estimate: float, values: np.ndarray, level: float = LEVEL, floor: Optional[float] = None,
                ceiling: Optional[float] = None) -> Interval:
    """A point estimate with the interval of its bootstrap values (`floor`, `ceiling`: the metric's range)."""
    return Interval(float(estimate), *_bounds(_centred(float(estimate), values), level, floor, ceiling))


def difference_of(estimate_a: float, values_a: np.ndarray, estimate_b: float, values_b: np.ndarray,
                  level: float = LEVEL) -> Interval:
    """b − a from per-replicate values computed on the same indices (what `difference` computes, from stored
    values: tables made in parts compare rows whose replicates were computed apart)."""
    d = np.asarray(values_b, np.float64) - np.asarray(values_a, np.float64)
    estimate = float(estimate_b - estimate_a)
    d = _centred(estimate, d)
    return Interval(estimate, *_bounds(d, level), p=_p_value(estimate, d))


def _weighted_stats(x: np.ndarray, counts: np.ndarray):
    """Mean and unbiased covariance of the rows of x repeated counts[i] times."""
    n = counts.sum()
    mu = counts @ x / n
    second = (x.T * counts) @ x
    return mu, (second - n * np.outer(mu, mu)) / (n - 1)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_with_root(mu1, s1, mu2, s2, root2) -> float:
    """tr √(Σ₁Σ₂) = Σ √λ(√Σ₂ Σ₁ √Σ₂), a symmetric eigenproblem (faster and steadier than eigvals of Σ₁Σ₂)."""
    eig = np.linalg.eigvalsh(root2 @ s1 @ root2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


def set_replicates(sets: dict, reference: Optional[np.ndarray], paired_with: Optional[str],
                   indices: np.ndarray, means: Sequence[str] = (), reference_metric: str = "fd_real") -> dict:
    """For named sets of one image list ({name: {"correct": [n] bool, "features": [n, D], <mean>: [n]}}), every
    metric on all images and on each replicate of `indices` (the same image indices for every set):
      class_accuracy; each per-image score of `means` (e.g. a zero-shot task's kept-region PSNR), averaged;
      `reference_metric` (fd_real), the Fréchet distance to the fixed `reference` features (real images, not
      resampled); fd_fp, the Fréchet distance to set `paired_with` (the FP model's images of the same keys),
      both sets resampled together.
    Returns {name: {metric: (estimate, values [R])}}."""
    n = indices.shape[1]
    names = list(sets)
    for name in names:
        _check([sets[name]["correct"], sets[name]["features"]] + [sets[name][m] for m in means], n)
    feats = {k: np.asarray(sets[k]["features"], np.float64) for k in names}
    correct = {k: np.asarray(sets[k]["correct"], np.float64) for k in names}
    scores = {k: {m: np.asarray(sets[k][m], np.float64) for m in means} for k in names}
    ref = None
    if reference is not None:
        mu_r, s_r = _stats(reference)
        ref = (mu_r, s_r, _sqrt_psd(s_r))

    def one(counts):
        out = {}
        stats = {k: _weighted_stats(feats[k], counts) for k in names}
        root_fp = _sqrt_psd(stats[paired_with][1]) if paired_with is not None else None
        for k in names:
            m = {"class_accuracy": float(counts @ correct[k] / n)}
            m.update({name: float(counts @ x / n) for name, x in scores[k].items()})
            if ref is not None:
                m[reference_metric] = _frechet_with_root(*stats[k], ref[0], ref[1], ref[2])
            if paired_with is not None and k != paired_with:
                m["fd_fp"] = _frechet_with_root(*stats[k], *stats[paired_with], root_fp)
            out[k] = m
        return out

    full = one(np.ones(n))
    reps = [one(np.bincount(idx, minlength=n).astype(np.float64)) for idx in indices]
    return {k: {m: (full[k][m], np.array([r[k][m] for r in reps])) for m in full[k]} for k in names}
