"""The paired bootstrap of the evaluation protocol: coverage, what pairing buys, Fréchet distances per replicate,
Holm's adjustment and the wording of findings."""
import numpy as np
import pytest

from varq_jax.eval import metrics, paired


def test_interval_of_a_mean_has_the_normal_width():
    x = np.random.default_rng(0).normal(size=1000)
    iv = paired.interval(lambda v: float(v.mean()), [x], paired.replicate_indices(1000, 2000, seed=1))
    assert iv.low < iv.estimate < iv.high and iv.low < 0 < iv.high
    assert (iv.high - iv.low) == pytest.approx(2 * 1.96 / np.sqrt(1000), rel=0.15)


def test_pairing_measures_a_small_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    a = rng.normal(size=500)
    b = a + 0.05 + 0.01 * rng.normal(size=500)           # the same images, slightly better
    idx = paired.replicate_indices(500, 1000, seed=3)
    mean = lambda v: float(v.mean())
    d = paired.difference(mean, [a], [b], idx)
    assert d.excludes_zero and d.low > 0.04 and d.high < 0.06 and d.p < 0.01
    unpaired = paired.difference(mean, [a], [rng.permutation(b)], idx)     # pairing broken: same marginals
    assert (unpaired.high - unpaired.low) > 10 * (d.high - d.low)
    same = paired.difference(mean, [a], [a], idx)
    assert same.estimate == same.low == same.high == 0 and not same.excludes_zero and same.p == 1.0
    assert paired.verdict("accuracy", same, lower_is_better=False).endswith("no measurable difference")
    assert paired.verdict("FD", d, lower_is_better=True).endswith(": worse")


def test_frechet_per_replicate_equals_the_metric_and_fd_to_fp_pairs_images():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(300, 8)), rng.normal(0.2, 1.1, size=(300, 8))
    assert paired.fd_between(f1, f2) == pytest.approx(metrics.frechet_distance(f1, f2), rel=1e-6)
    real = rng.normal(size=(400, 8))
    assert paired.fd_to(real)(f1) == pytest.approx(metrics.frechet_distance(f1, real), rel=1e-6)
    iv = paired.interval(paired.fd_between, [f1, f2], paired.replicate_indices(300, 200, seed=5))
    assert 0 < iv.low < iv.estimate < iv.high
    with pytest.raises(ValueError, match="one per image"):
        paired.interval(paired.fd_between, [f1, f2[:10]], paired.replicate_indices(300, 5))


def test_holm_adjusts_as_the_step_down_procedure():
    assert paired.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert paired.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    d = paired.Interval(0.1, 0.05, 0.15, p=0.02)
    assert paired.verdict("x", d, False, adjusted_p=0.08).endswith("no measurable difference")
    assert paired.verdict("x", d, False, adjusted_p=0.03).endswith(": better")
