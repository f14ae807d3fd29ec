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


def test_p_values_resolve_what_a_large_holm_family_needs():
    """Where the replicates beyond 0 resolve it, the p-value is their two-sided tail; a clear difference gets a p far
    below 1/replicates, so that it survives Holm's adjustment over a full table's ~140 comparisons (the tail count
    cannot go below 0.001, and 140 × 0.001 > 0.05)."""
    rng = np.random.default_rng(8)
    a = rng.normal(size=2000)
    idx = paired.replicate_indices(2000, 2000, seed=9)
    mean = lambda v: float(v.mean())
    for shift in (0.03, 0.05):                              # z ≈ 1.3 and 2.2: tails of hundreds and tens of replicates
        b = a + shift + rng.normal(size=2000)
        d = paired.difference(mean, [a], [b], idx)
        reps = np.array([b[i].mean() - a[i].mean() for i in idx])
        reps += d.estimate - reps.mean()
        tail = 2 * min(np.mean(reps <= 0), np.mean(reps >= 0))
        assert 0.01 < tail < 0.5 and d.p == pytest.approx(tail, rel=0.25)
    clear = paired.difference(mean, [a], [a + 0.2 + 0.5 * rng.normal(size=2000)], idx)
    assert clear.p < 1e-6 and paired.holm([clear.p] * 140)[0] < 0.05


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


def test_the_interval_of_an_fd_is_its_spread_around_the_estimate():
    """Resampling with replacement inflates a Fréchet distance: the replicates' percentiles lie above the estimate
    (the research model's noise row: 0.54 against [0.79, 1.38]); with the bootstrap's bias removed the interval holds
    the estimate and keeps the replicates' spread."""
    rng = np.random.default_rng(6)
    f1, f2 = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    idx = paired.replicate_indices(300, 400, seed=7)
    reps = np.array([paired.fd_between(f1[i], f2[i]) for i in idx])
    estimate = paired.fd_between(f1, f2)
    assert np.percentile(reps, 2.5) > estimate                         # plain percentiles miss it
    iv = paired.interval_of(estimate, reps, floor=0.0)
    assert 0 <= iv.low < iv.estimate < iv.high
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert iv.high - iv.estimate == pytest.approx(hi - reps.mean())
    d = paired.difference_of(0.0, np.zeros(400), estimate, reps)
    assert d.estimate == estimate and d.low < estimate < d.high


def test_an_accuracy_interval_stays_within_0_and_1():
    """Centring the replicates on the estimate can push a percentile past the metric's range (a tiny set at
    accuracy 0.75 gave [0.41, 1.0025]); a row's interval is clipped to it, a distance's only from below."""
    from varq_jax.runs import protocol
    rng = np.random.default_rng(8)
    correct = rng.random(8) < 0.75
    reps = np.array([correct[i].mean() for i in paired.replicate_indices(8, 400, seed=9)])
    estimate = 0.99                                                  # an estimate near the top of the range
    raw = paired.interval_of(estimate, reps)
    assert raw.high > 1                                              # what centring alone gives
    iv = protocol.row_intervals({"class_accuracy": (estimate, reps), "fd_real": (0.0, reps - reps.mean())})
    assert iv["class_accuracy"]["high"] == 1.0 and iv["class_accuracy"]["low"] == pytest.approx(raw.low)
    assert iv["fd_real"]["low"] == 0.0 and iv["fd_real"]["high"] > 0


def test_holm_adjusts_as_the_step_down_procedure():
    assert paired.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert paired.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    d = paired.Interval(0.1, 0.05, 0.15, p=0.02)
    assert paired.verdict("x", d, False, adjusted_p=0.08).endswith("no measurable difference")
    assert paired.verdict("x", d, False, adjusted_p=0.03).endswith(": better")


# --- the protocol's comparisons and their wording ----------------------------------------------------------------
def _rows_and_values():
    """Three synthetic rows on 400 paired images: brecq clearly more accurate than baseline, full the same as brecq."""
    from varq_jax.runs import protocol
    rng = np.random.default_rng(0)
    n = 400
    base = rng.random(n) < 0.6
    better = base | (rng.random(n) < 0.5)                       # flips about half the misses to hits
    same = better.copy()
    same[:4] = ~same[:4]                                        # four images differ either way
    feats = rng.normal(size=(n, 4))
    sets = {"fp": {"correct": rng.random(n) < 0.9, "features": feats},
            "w4a4_baseline": {"correct": base, "features": feats + 0.5},
            "w4a4_brecq": {"correct": better, "features": feats + 0.2},
            "w4a4_full": {"correct": same, "features": feats + 0.2}}
    rows = [{"name": "fp", "preset": "fp", "method": "–", "w_bits": None, "a_bits": None}] + [
        {"name": f"w4a4_{m}", "preset": "w4a4", "method": m, "w_bits": 4, "a_bits": 4, "calib_seed": 2025}
        for m in ("baseline", "brecq", "full")]
    p = protocol.Protocol(replicates=500, images_per_seed=n // 3 + 1)
    values = protocol.bootstrap(sets, None, "fp", p)
    return rows, values, p


def test_comparisons_call_only_what_the_intervals_allow():
    from varq_jax.runs import protocol
    rows, values, p = _rows_and_values()
    comps = protocol.comparisons(rows, values)
    by = {(c["what"], c["metric"]): c for c in comps if c["what"] != "against FP"}
    rec = by[("reconstruction", "class_accuracy")]
    assert rec["low"] > 0 and rec["verdict"] == "better"               # brecq gains, the interval excludes 0
    both = by[("both", "class_accuracy")]
    assert both["low"] <= 0 <= both["high"] and both["verdict"] == "no measurable difference"
    assert by[("reconstruction", "fd_fp")]["verdict"] == "better"      # lower FD to FP is better
    tested = [c for c in comps if c["p"] is not None]
    np.testing.assert_allclose([c["p_holm"] for c in tested], paired.holm([c["p"] for c in tested]))
    lines = protocol.findings(rows, comps, p)
    assert lines[0].startswith(f"{len(tested)} comparisons are stated below") and "Holm-adjusted" in lines[0]
    assert any("W4A4, calib seed 2025, both (brecq → full): class accuracy" in s
               and s.endswith("no measurable difference.") for s in lines)
    # the same rows on a second calibration seed: the verdicts are compared across seeds
    again = [dict(r, name=r["name"] + "_c2026", calib_seed=2026) for r in rows[1:]]
    values2 = {**values, **{r["name"]: values[r["name"][:-6]] for r in again}}
    lines = protocol.findings(rows + again, protocol.comparisons(rows + again, values2), p)
    assert any(s.startswith("W4A4, reconstruction on class_accuracy over 2 calibration seeds: the same on every one")
               for s in lines)


def test_calibration_sets_are_compared_as_their_own_family():
    """The same method on a second calibration set: brecq's second set recovers fewer images (a clear move), the
    baseline's is the same model (no real set here: class accuracy and FD to FP); the family is Holm-adjusted apart
    from the method comparisons."""
    from varq_jax.runs import protocol
    rows, values, p = _rows_and_values()
    rng = np.random.default_rng(1)
    n = 400
    base = rng.random(n) < 0.6
    feats = rng.normal(size=(n, 4))
    sets = {"fp": {"correct": rng.random(n) < 0.9, "features": feats},
            "w4a4_baseline": {"correct": base, "features": feats + 0.5},
            "w4a4_brecq": {"correct": base | (rng.random(n) < 0.5), "features": feats + 0.2},
            "w4a4_baseline_c2026": {"correct": base, "features": feats + 0.5},
            "w4a4_brecq_c2026": {"correct": base, "features": feats + 0.5}}
    rows = rows[:3] + [dict(r, name=r["name"] + "_c2026", calib_seed=2026) for r in rows[1:3]]
    values = protocol.bootstrap(sets, None, "fp", p)
    comps = protocol.calibration_comparisons(rows, values)
    assert {(c["a"], c["b"]) for c in comps} == {("w4a4_baseline", "w4a4_baseline_c2026"),
                                                 ("w4a4_brecq", "w4a4_brecq_c2026")}
    assert len(comps) == 4 and all(c["calib_from"] == 2025 and c["calib_seed"] == 2026 for c in comps)
    np.testing.assert_allclose([c["p_holm"] for c in comps], paired.holm([c["p"] for c in comps]))
    by = {(c["b"], c["metric"]): c for c in comps}
    assert by[("w4a4_brecq_c2026", "class_accuracy")]["high"] < 0                 # the second set lost accuracy
    assert by[("w4a4_baseline_c2026", "class_accuracy")]["estimate"] == 0
    lines = protocol.calibration_findings(rows, comps)
    assert lines[0].startswith("Calibration sets: 4 comparisons") and "own family of 4" in lines[0]
    assert any(s.startswith("W4A4 brecq, calibration seed 2025 → 2026: class accuracy -")
               and s.endswith("the calibration sets give different models.") for s in lines)
    assert any(s.startswith("W4A4 baseline, calibration seed 2025 → 2026: class accuracy +0 ")
               and s.endswith("no measurable difference.") for s in lines)
    main = protocol.comparisons(rows, values)                                     # not in the method family
    assert all(c["what"] != "calibration set" for c in main)
    assert protocol.calibration_comparisons(rows[:3], values) == []


def test_protocol_refuses_bad_settings():
    from varq_jax.runs import protocol
    with pytest.raises(ValueError, match="differ from the seeds"):
        protocol.Protocol(seeds=(0, 1), noise_seeds=(1, 2))
    with pytest.raises(ValueError, match="one noise seed with each seed"):
        protocol.Protocol(seeds=(0, 1, 2), noise_seeds=(3,))
    assert protocol.Protocol().calib_seeds_of("w4a4") == (2025, 2026)
    assert protocol.Protocol().calib_seeds_of("w8a8") == (2025,)
    p = protocol.Protocol(extra_calib=(("w4a6", (7, 8)),))
    assert protocol.from_dict(p.to_dict()) == p


def test_litevar_rows_are_compared_as_the_paper_compares_them():
    """LiteVAR (fc2 kept at 16 bits) against BRECQ, the method with and without it: the paper's three columns."""
    from varq_jax.runs import protocol
    rows, values, p = _rows_and_values()
    lite = [dict(rows[-1], name=f"w4a4_{m}", method=m) for m in ("litevar", "full_litevar")]
    values = {**values, "w4a4_litevar": values["w4a4_brecq"], "w4a4_full_litevar": values["w4a4_full"]}
    comps = protocol.comparisons(rows + lite, values)
    pairs = {(c["a"], c["b"]) for c in comps if c["metric"] == "class_accuracy" and c["what"] != "against FP"}
    assert {("w4a4_brecq", "w4a4_litevar"), ("w4a4_full", "w4a4_full_litevar"),
            ("w4a4_litevar", "w4a4_full_litevar")} <= pairs
    c = next(c for c in comps if (c["a"], c["b"], c["metric"]) == ("w4a4_brecq", "w4a4_litevar", "class_accuracy"))
    assert c["estimate"] == 0 and c["verdict"] == "no measurable difference"      # the same images here
    assert any(s.startswith("W4A4, calib seed 2025, LiteVAR's fc2 rule (brecq → litevar): class accuracy +0 ")
               for s in protocol.findings(rows + lite, comps, p))
