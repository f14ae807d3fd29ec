"""FID / sFID / IS / precision-recall / reference batches against independent NumPy references."""
import types
import warnings

import numpy as np
import pytest

from varq_jax.eval import metrics as M
from varq_jax.eval.inception import POOL_DIM, SPATIAL_DIM


# --- Fréchet distance ----------------------------------------------------------------------------------------
def _frechet_via_eigh(x, y):
    """tr √(Σ₁Σ₂) = Σ √λ(√Σ₁ Σ₂ √Σ₁): symmetric eigendecompositions only, no sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum()


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((12, 12))
    x = rng.standard_normal((400, 12))
    y = rng.standard_normal((300, 12)) @ mix * 0.5 + 0.3
    want = _frechet_via_eigh(x, y)
    assert want > 1.0
    np.testing.assert_allclose(M.frechet_distance(x, y), want, rtol=1e-9)
    np.testing.assert_allclose(M.frechet_distance(M.feature_stats(x), M.feature_stats(y)), want, rtol=1e-9)
    # float32 features give the same statistics up to rounding (the evaluator's activations are float32)
    np.testing.assert_allclose(M.frechet_distance(x.astype(np.float32), y.astype(np.float32)), want, rtol=1e-5)
    assert abs(M.frechet_distance(x, x)) < 1e-8


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    a = M.FeatureStats(np.array([1.5]), np.array([[4.0]]))
    b = M.FeatureStats(np.array([-0.5]), np.array([[0.25]]))
    assert M.frechet_distance(a, b) == pytest.approx((1.5 + 0.5) ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_feature_stats_are_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    s = M.feature_stats(x)
    np.testing.assert_allclose(s.mu, [2.0, 2.0])
    np.testing.assert_allclose(s.sigma, [[4.0, 3.0], [3.0, 3.0]])
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        M.feature_stats(np.zeros((1, 4)))


def test_frechet_distance_singular_product_retries_with_eps():
    # Σ₁Σ₂ = [[0, 1], [0, 0]] has no square root; the evaluator adds eps·I to both and retries:
    # √((1+eps)[[eps, 1], [0, eps]]) has trace 2√(eps(1+eps)).
    eps = 1e-6
    a = M.FeatureStats(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]))
    b = M.FeatureStats(np.zeros(2), np.eye(2))
    with pytest.warns(UserWarning, match="singular product"):
        got = M.frechet_distance(a, b, eps=eps)
    assert got == pytest.approx(2.0 - 4.0 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_frechet_distance_rejects_large_imaginary_part_and_mismatched_dims():
    with pytest.raises(ValueError, match="imaginary component"):
        M.frechet_distance(M.FeatureStats(np.zeros(2), np.diag([1.0, -1.0])), M.FeatureStats(np.zeros(2), np.eye(2)))
    with pytest.raises(ValueError, match="differ in dimension"):
        M.frechet_distance(np.random.rand(10, 3), np.random.rand(10, 4))


# --- Inception Score ---------------------------------------------------------------------------------------
def _is_reference(logits, split):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
    return np.mean(scores)


def test_inception_score_known_values():
    assert M.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)        # uniform
    assert M.inception_score(np.full((50, 1008), 3.7)) == pytest.approx(1.0, abs=1e-12)
    onehot = 60.0 * np.eye(10, 1008)                                                       # 10 sure, distinct
    assert M.inception_score(onehot) == pytest.approx(10.0, rel=1e-9)
    same_class = 60.0 * np.eye(1, 1008).repeat(10, 0)                                      # sure, all alike
    assert M.inception_score(same_class) == pytest.approx(1.0, rel=1e-9)


def test_inception_score_splits_into_chunks():
    distinct = 60.0 * np.eye(10, 1008)
    alike = 60.0 * np.eye(1, 1008).repeat(10, 0)
    logits = np.concatenate([distinct, alike])
    assert M.inception_score(logits, split_size=10) == pytest.approx((10.0 + 1.0) / 2, rel=1e-9)
    # one split of 20: p(y) is 11/20 on class 0 and 1/20 on classes 1..9
    one_split = np.exp((9 * np.log(20.0) + 11 * np.log(20.0 / 11)) / 20)
    assert M.inception_score(logits) == pytest.approx(one_split, rel=1e-9)


def test_inception_score_matches_reference_with_default_split():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (11000, 40)).astype(np.float32)          # splits of 5000, 5000, 1000
    assert M.IS_SPLIT_SIZE == 5000
    np.testing.assert_allclose(M.inception_score(logits), _is_reference(logits, 5000), rtol=1e-10)


def test_inception_score_survives_underflow():
    logits = np.zeros((4, 1008))
    logits[np.arange(4), np.arange(4)] = 2000.0            # every other probability underflows to exactly 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.inception_score(logits) == pytest.approx(4.0, rel=1e-12)


# --- precision / recall ------------------------------------------------------------------------------------
def _brute(ref, smp, k=3):
    ref, smp = ref.astype(np.float64), smp.astype(np.float64)
    sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
    r_smp = np.sort(sq(smp, smp), axis=1)[:, k]
    cross = sq(ref, smp)
    precision = (cross <= r_ref[:, None]).any(axis=0).mean()
    recall = (cross <= r_smp[None, :]).any(axis=1).mean()
    return precision, recall, r_ref, r_smp


def test_precision_recall_float32_matches_brute_force_across_tilings():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((120, 24)).astype(np.float32)
    smp = (rng.standard_normal((90, 24)) + 0.3).astype(np.float32)
    p, r, r_ref, _ = _brute(ref, smp)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95                       # not a trivial case
    np.testing.assert_allclose(M.manifold_radii(ref, distance_dtype="float32"), r_ref, rtol=1e-5)
    for rows, cols in ((10000, 10000), (37, 23)):
        got = M.precision_recall(ref, smp, row_batch=rows, col_batch=cols, distance_dtype="float32")
        assert got == (pytest.approx(p, abs=1e-12), pytest.approx(r, abs=1e-12))


def test_precision_recall_float16_default_on_exact_integer_features():
    # Small integers keep every norm and dot product exact in float16, so the evaluator's half-precision
    # path must reproduce the exact answer, including its `<=` on the many tied distances.
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, (70, 8)).astype(np.float32)
    smp = rng.integers(0, 5, (60, 8)).astype(np.float32)
    p, r, r_ref, r_smp = _brute(ref, smp)
    np.testing.assert_array_equal(M.manifold_radii(ref, row_batch=32, col_batch=25), r_ref)
    np.testing.assert_array_equal(M.manifold_radii(smp), r_smp)
    assert M.precision_recall(ref, smp, row_batch=32, col_batch=25) == (p, r)
    assert 0 < p < 1 and 0 < r < 1


def test_float16_overflow_falls_back_to_float32():
    rng = np.random.default_rng(4)
    big = (rng.standard_normal((40, 16)) * 100).astype(np.float32)  # squared norms beyond float16's 65504
    got = np.asarray(M.pairwise_squared_distances(big[:20], big[20:]))
    want = ((big[:20, None].astype(np.float64) - big[None, 20:]) ** 2).sum(-1)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    p, r, _, _ = _brute(big[:20], big[20:])
    assert M.precision_recall(big[:20], big[20:]) == (pytest.approx(p), pytest.approx(r))


def test_float16_distances_are_rounded_like_half_precision():
    # 100.1 is 100.125 in float16 and its square rounds to a multiple of 8; float32 keeps 100.1² ≈ 10020.01.
    u = np.array([[100.1, 0.0]], np.float32)
    v = np.zeros((1, 2), np.float32)
    assert float(M.pairwise_squared_distances(u, v, "float32")[0, 0]) == pytest.approx(100.1 ** 2, rel=1e-6)
    d16 = float(M.pairwise_squared_distances(u, v, "float16")[0, 0])
    assert d16 == float(np.float16(np.float16(100.1) ** 2)) == 10024.0


def test_precision_recall_rejects_bad_arguments():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="more than k=3"):
        M.manifold_radii(x[:3])
    with pytest.raises(ValueError, match="dimensions differ"):
        M.precision_recall(x, np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="distance_dtype"):
        M.precision_recall(x, x, distance_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        M.precision_recall(x[0], x)


# --- reference batches -------------------------------------------------------------------------------------
def _stats_arrays(rng):
    return dict(mu=rng.standard_normal(POOL_DIM).astype(np.float32),
                sigma=np.eye(POOL_DIM, dtype=np.float32) * 2,
                mu_s=rng.standard_normal(SPATIAL_DIM).astype(np.float32),
                sigma_s=np.eye(SPATIAL_DIM, dtype=np.float32) * 3)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_load_reference_batch_with_statistics(tmp_path, save):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    stats = _stats_arrays(rng)
    path = tmp_path / "ref.npz"
    save(path, arr_0=images, **stats)
    ref = M.load_reference_batch(str(path), image_size=8)
    assert (ref.num_images, ref.image_size) == (5, (8, 8))
    np.testing.assert_array_equal(ref.pool_stats.mu, stats["mu"])
    np.testing.assert_array_equal(ref.pool_stats.sigma, stats["sigma"])
    np.testing.assert_array_equal(ref.spatial_stats.mu, stats["mu_s"])
    np.testing.assert_array_equal(ref.spatial_stats.sigma, stats["sigma_s"])
    batches = list(ref.iter_images(2))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_load_reference_batch_without_statistics(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((3, 4, 4, 3), np.uint8))
    ref = M.load_reference_batch(str(path))
    assert ref.pool_stats is None and ref.spatial_stats is None


def test_load_reference_batch_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="holds 4x4 images, expected 256x256"):
        M.load_reference_batch(str(good), image_size=256)
    with pytest.raises(ValueError, match="cannot read reference batch"):
        M.load_reference_batch(str(tmp_path / "absent.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read reference batch"):
        M.load_reference_batch(str(junk))
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((3, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        M.load_reference_batch(str(floats))
    no_images = tmp_path / "no_images.npz"
    np.savez(no_images, mu=np.zeros(POOL_DIM))
    with pytest.raises(ValueError, match="no images"):
        M.load_reference_batch(str(no_images))
    partial = tmp_path / "partial.npz"
    np.savez(partial, arr_0=np.zeros((3, 4, 4, 3), np.uint8), mu=np.zeros(POOL_DIM), sigma=np.eye(POOL_DIM))
    with pytest.raises(ValueError, match="needs all of"):
        M.load_reference_batch(str(partial))
    wrong_dim = tmp_path / "wrong_dim.npz"
    stats = _stats_arrays(np.random.default_rng(6))
    stats["mu"] = np.zeros(1000, np.float32)
    np.savez(wrong_dim, arr_0=np.zeros((3, 4, 4, 3), np.uint8), **stats)
    with pytest.raises(ValueError, match=r"mu has shape \(1000,\), expected \(2048,\)"):
        M.load_reference_batch(str(wrong_dim))


# --- the evaluator's report --------------------------------------------------------------------------------
def test_adm_scores_combines_the_metrics():
    rng = np.random.default_rng(7)
    feats = lambda n: types.SimpleNamespace(pool=rng.standard_normal((n, 6)).astype(np.float32),
                                            spatial=rng.standard_normal((n, 5)).astype(np.float32),
                                            logits=rng.normal(0, 2, (n, 12)).astype(np.float32))
    smp, ref = feats(40), feats(50)
    got = M.adm_scores(smp, ref.pool, reference_spatial=ref.spatial, distance_dtype="float32")
    p, r, _, _ = _brute(ref.pool, smp.pool)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert got["fid"] == pytest.approx(_frechet_via_eigh(smp.pool.astype(np.float64), ref.pool.astype(np.float64)))
    assert got["sfid"] == pytest.approx(_frechet_via_eigh(smp.spatial.astype(np.float64),
                                                          ref.spatial.astype(np.float64)))
    assert got["inception_score"] == pytest.approx(_is_reference(smp.logits, 5000))
    given = (M.feature_stats(ref.pool), M.FeatureStats(np.zeros(5), np.eye(5)))
    with_stats = M.adm_scores(smp, ref.pool, reference_stats=given, distance_dtype="float32")
    assert with_stats["sfid"] == pytest.approx(M.frechet_distance(smp.spatial, given[1]))
    with pytest.raises(ValueError, match="reference_spatial"):
        M.adm_scores(smp, ref.pool)
