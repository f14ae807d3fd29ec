"""FID, sFID, Inception Score and precision/recall as OpenAI's ADM evaluator computes them
(guided-diffusion `evaluations/evaluator.py`), which the VAR and Shift-and-Sum papers report.

* Statistics: mean and `np.cov` (unbiased) in float64. The evaluator keeps the mean in float32; float64 only
  removes rounding.
* Fréchet distance: float64, `scipy.linalg.sqrtm(Σ₁Σ₂)`; a non-finite root is retried with eps·I added to both
  covariances (with a warning), a complex root with a diagonal imaginary part beyond 1e-3 is an error, a
  smaller one is dropped. Works on any feature set (Inception pool/spatial features, a classifier's features).
* Inception Score: softmax of the 1008 logits, split into chunks of 5000 (10 splits for 50k samples),
  exp(mean KL(p(y|x) ‖ p(y))) per chunk, averaged. Computed in float64 from log-softmax, so an underflowed
  probability contributes 0·log 0 = 0 where the evaluator's float32 `p·log p` would give NaN.
* Precision/recall (improved precision and recall, k = 3): radius of each point = squared distance to its
  k-th nearest neighbour in its own set (itself at rank 0); a sample counts for precision if it lies within
  some reference point's radius, a reference point counts for recall if it lies within some sample's.
  Distances are the evaluator's `max(‖u‖² − 2u·v + ‖v‖², 0)`, computed first in float16 per 10000×10000 tile
  and recomputed in float32 when a tile has a non-finite entry — so tiles match its session runs. Here the
  tiles are jitted jnp; the k nearest are merged tile by tile with `top_k`, so memory is O(tile), not O(N²).
  Float16 rounding is emulated, not bit-identical to TF on a GPU; `distance_dtype="float32"` skips it.
"""
import dataclasses
import functools
import io
import os
import warnings
import zipfile
import zlib
from typing import Iterator, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from scipy import linalg

from varq_jax.eval.inception import POOL_DIM, SPATIAL_DIM

NEIGHBOURHOOD_K = 3
ROW_BATCH = 10000
COL_BATCH = 10000
IS_SPLIT_SIZE = 5000
DISTANCE_DTYPES = ("float16", "float32")


# --- Fréchet distance ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature set: mean [D] and covariance [D, D], float64."""
    mu: np.ndarray
    sigma: np.ndarray


def feature_stats(features) -> FeatureStats:
    """Mean and unbiased covariance (rows are samples), as `np.mean` / `np.cov(rowvar=False)`."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
    return FeatureStats(mu=x.mean(axis=0), sigma=np.atleast_2d(np.cov(x, rowvar=False)))


def _as_stats(x: Union[FeatureStats, np.ndarray]) -> FeatureStats:
    if isinstance(x, FeatureStats):
        return FeatureStats(np.atleast_1d(np.asarray(x.mu, np.float64)), np.atleast_2d(np.asarray(x.sigma, np.float64)))
    return feature_stats(x)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():       # SciPy < 1.16 prints on singular input; the caller checks the result
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(a)
    return root[0] if isinstance(root, tuple) else root


def frechet_distance(a: Union[FeatureStats, np.ndarray], b: Union[FeatureStats, np.ndarray],
                     eps: float = 1e-6) -> float:
    """‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂) between two `FeatureStats` or two [N, D] feature arrays."""
    a, b = _as_stats(a), _as_stats(b)
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics differ in dimension: mu {a.mu.shape} vs {b.mu.shape}, "
                         f"sigma {a.sigma.shape} vs {b.sigma.shape}")
    if a.sigma.shape != (a.mu.shape[0],) * 2:
        raise ValueError(f"sigma {a.sigma.shape} does not match mu {a.mu.shape}")
    diff = a.mu - b.mu
    covmean = _sqrtm(a.sigma.dot(b.sigma))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = _sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


# --- Inception Score ---------------------------------------------------------------------------------------
def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive chunks of `split_size` of exp(E_x KL(p(y|x) ‖ p(y))), p(y) the chunk's mean."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"logits must be [N >= 1, classes], got shape {z.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        with np.errstate(divide="ignore"):
            log_marginal = np.log(part.mean(axis=0, keepdims=True))
        kl = (part * np.where(part > 0, log_part - log_marginal, 0.0)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# --- precision / recall -------------------------------------------------------------------------------------
def _squared_distances(u: jax.Array, v: jax.Array, dtype) -> jax.Array:
    u, v = u.astype(dtype), v.astype(dtype)
    norm_u = jnp.sum(jnp.square(u), axis=1, dtype=jnp.float32).astype(dtype)[:, None]
    norm_v = jnp.sum(jnp.square(v), axis=1, dtype=jnp.float32).astype(dtype)[None, :]
    uv = jnp.matmul(u, v.T, preferred_element_type=jnp.float32, precision="highest").astype(dtype)
    return jnp.maximum(norm_u - 2 * uv + norm_v, 0)


def pairwise_squared_distances(u: jax.Array, v: jax.Array, distance_dtype: str = "float16") -> jax.Array:
    """The evaluator's DistanceBlock for one tile: [r, D], [c, D] → float32 [r, c] squared distances."""
    d32 = lambda: _squared_distances(u, v, jnp.float32)
    if distance_dtype == "float32":
        return d32()
    d16 = _squared_distances(u, v, jnp.float16)
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32), d32)


@functools.partial(jax.jit, static_argnames=("distance_dtype",))
def _merge_nearest(nearest, rows, cols, distance_dtype):
    d = pairwise_squared_distances(rows, cols, distance_dtype)
    merged = jnp.concatenate([nearest, d], axis=1)
    return -jax.lax.top_k(-merged, nearest.shape[1])[0]


@functools.partial(jax.jit, static_argnames=("distance_dtype",))
def _inside_tile(ref, ref_radii, sample, sample_radii, distance_dtype):
    d = pairwise_squared_distances(ref, sample, distance_dtype)
    ref_inside = jnp.any(d <= sample_radii[None, :], axis=1)       # ref point in some sample's ball → recall
    sample_inside = jnp.any(d <= ref_radii[:, None], axis=0)       # sample in some ref point's ball → precision
    return ref_inside, sample_inside


def _check_pr_args(distance_dtype, row_batch, col_batch):
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, got {distance_dtype!r}")
    if row_batch < 1 or col_batch < 1:
        raise ValueError(f"row_batch and col_batch must be positive, got {row_batch}, {col_batch}")


def _as_features(x, name: str) -> jax.Array:
    if np.ndim(x) != 2:
        raise ValueError(f"{name} must be [N, D], got shape {np.shape(x)}")
    return jnp.asarray(x, jnp.float32)


def manifold_radii(features, k: int = NEIGHBOURHOOD_K, *, row_batch: int = ROW_BATCH,
                   col_batch: int = COL_BATCH, distance_dtype: str = "float16") -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in `features` (itself is rank 0)."""
    _check_pr_args(distance_dtype, row_batch, col_batch)
    x = _as_features(features, "features")
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = np.empty(n, np.float32)
    for r0 in range(0, n, row_batch):
        rows = x[r0:r0 + row_batch]
        nearest = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)
        for c0 in range(0, n, col_batch):
            nearest = _merge_nearest(nearest, rows, x[c0:c0 + col_batch], distance_dtype)
        radii[r0:r0 + rows.shape[0]] = np.asarray(nearest[:, k])
    return radii


def precision_recall(reference, samples, k: int = NEIGHBOURHOOD_K, *, row_batch: int = ROW_BATCH,
                     col_batch: int = COL_BATCH, distance_dtype: str = "float16") -> Tuple[float, float]:
    """(precision, recall) of `samples` [N2, D] against `reference` [N1, D] (Inception pool features)."""
    _check_pr_args(distance_dtype, row_batch, col_batch)
    ref, smp = _as_features(reference, "reference"), _as_features(samples, "samples")
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref.shape[1]}, samples {smp.shape[1]}")
    kw = dict(row_batch=row_batch, col_batch=col_batch, distance_dtype=distance_dtype)
    ref_radii = jnp.asarray(manifold_radii(ref, k, **kw))
    smp_radii = jnp.asarray(manifold_radii(smp, k, **kw))
    ref_inside = np.zeros(ref.shape[0], bool)
    smp_inside = np.zeros(smp.shape[0], bool)
    for r0 in range(0, ref.shape[0], row_batch):
        r1 = min(r0 + row_batch, ref.shape[0])
        for c0 in range(0, smp.shape[0], col_batch):
            c1 = min(c0 + col_batch, smp.shape[0])
            r_in, s_in = _inside_tile(ref[r0:r1], ref_radii[r0:r1], smp[c0:c1], smp_radii[c0:c1], distance_dtype)
            ref_inside[r0:r1] |= np.asarray(r_in)
            smp_inside[c0:c1] |= np.asarray(s_in)
    return float(smp_inside.mean()), float(ref_inside.mean())


# --- reference batches --------------------------------------------------------------------------------------
_STAT_KEYS = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
              "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}


@dataclasses.dataclass(frozen=True)
class ReferenceBatch:
    """An ADM reference batch npz: uint8 images `arr_0` [N, H, W, 3], streamed, and optional precomputed
    statistics of their pool (`mu`, `sigma`) and spatial (`mu_s`, `sigma_s`) Inception features."""
    path: str
    num_images: int
    image_size: Tuple[int, int]
    pool_stats: Optional[FeatureStats]
    spatial_stats: Optional[FeatureStats]

    def iter_images(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive uint8 batches of `arr_0` without loading the whole array."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                buf = f.read(count * per_image)
                if len(buf) != count * per_image:
                    raise ValueError(f"{self.path}: arr_0 ends after {start} images, header says {shape[0]}")
                yield np.frombuffer(buf, dtype).reshape((count,) + tuple(shape[1:]))


def _read_npy_header(f) -> tuple:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def load_reference_batch(path: str, image_size: Optional[int] = None) -> ReferenceBatch:
    """Opens a reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), checks it, reads its statistics.

    Statistics are used when the file has them (all four keys, as the evaluator does); otherwise they are None
    and the caller computes them from the images' Inception features (`feature_stats`).
    """
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read reference batch {path}: {e}") from e
    with zf:
        names = set(zf.namelist())
        if "arr_0.npy" not in names:
            raise ValueError(f"reference batch {path} has no images (arr_0); keys: {sorted(n[:-4] for n in names)}")
        with zf.open("arr_0.npy") as f:
            try:
                shape, fortran, dtype = _read_npy_header(f)
            except ValueError as e:
                raise ValueError(f"reference batch {path}: arr_0 is not a readable .npy: {e}") from e
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
            raise ValueError(f"reference batch {path}: arr_0 must be C-ordered uint8 [N, H, W, 3], "
                             f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}")
        if image_size is not None and tuple(shape[1:3]) != (image_size, image_size):
            raise ValueError(f"reference batch {path} holds {shape[1]}x{shape[2]} images, expected "
                             f"{image_size}x{image_size}")
        present = [k for k in _STAT_KEYS if f"{k}.npy" in names]
        stats = {}
        if present and len(present) != len(_STAT_KEYS):
            raise ValueError(f"reference batch {path} has statistics {present} but needs all of {list(_STAT_KEYS)}")
        for key, want in (_STAT_KEYS.items() if present else ()):
            try:
                arr = np.load(io.BytesIO(zf.read(f"{key}.npy")), allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"reference batch {path}: cannot read {key}: {e}") from e
            if arr.shape != want:
                raise ValueError(f"reference batch {path}: {key} has shape {arr.shape}, expected {want}")
            stats[key] = arr.astype(np.float64)
    return ReferenceBatch(
        path=os.fspath(path), num_images=int(shape[0]), image_size=(int(shape[1]), int(shape[2])),
        pool_stats=FeatureStats(stats["mu"], stats["sigma"]) if stats else None,
        spatial_stats=FeatureStats(stats["mu_s"], stats["sigma_s"]) if stats else None)


# --- the evaluator's report ---------------------------------------------------------------------------------
def adm_scores(samples, reference_pool, reference_stats: Optional[Tuple[FeatureStats, FeatureStats]] = None,
               reference_spatial=None, **pr_kwargs) -> Mapping[str, float]:
    """The evaluator's five numbers for sample Inception features (`.pool`, `.spatial`, `.logits`).

    `reference_pool` are the reference images' pool features (precision/recall always need them);
    `reference_stats` = (pool, spatial) statistics, e.g. from `load_reference_batch`, else they are computed
    from `reference_pool` and `reference_spatial`.
    """
    if reference_stats is None or reference_stats[0] is None:
        if reference_spatial is None:
            raise ValueError("without precomputed reference statistics, reference_spatial features are needed")
        reference_stats = (feature_stats(reference_pool), feature_stats(reference_spatial))
    precision, recall = precision_recall(reference_pool, samples.pool, **pr_kwargs)
    return {
        "inception_score": inception_score(samples.logits),
        "fid": frechet_distance(feature_stats(samples.pool), reference_stats[0]),
        "sfid": frechet_distance(feature_stats(samples.spatial), reference_stats[1]),
        "precision": precision,
        "recall": recall,
    }


def class_accuracy(logits, labels) -> float:
    """Top-1 accuracy of a classifier's logits w.r.t. the labels (clu's Accuracy: the same metric type the
    training loops and other JAX projects merge across batches and hosts)."""
    acc = clu_metrics.Accuracy.from_model_output(logits=jnp.asarray(logits, jnp.float32),
                                                  labels=jnp.asarray(labels, jnp.int32))
    return float(acc.compute())
