"""Calibration data resampling: invariants, fidelity to the official loop (replayed in NumPy), target counts."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax.quant import resampling as rs


def _sample_tokens(rng, probs):
    """One code per row by inverse CDF (never a zero-probability code)."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((cdf <= u).sum(-1), probs.shape[-1] - 1).astype(np.int32)


def _dense(rng, n, p, v):
    return rng.dirichlet(np.full(v, 0.5), size=(n, p)).astype(np.float32)


def _topk(rng, n, p, v, k):
    """Softmax over the k largest of random logits, zeros elsewhere (like top-k masking)."""
    logits = rng.normal(size=(n, p, v)) * 2.0 + rng.normal(size=v) * 1.5
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    weights = np.where(logits >= kth, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


def _disjoint(rng, n, p, v, groups):
    """Sample i only uses codes of group i % groups: under codes of other groups get zero restricted mass."""
    probs = np.zeros((n, p, v), np.float32)
    size = v // groups
    for i in range(n):
        lo = (i % groups) * size
        probs[i, :, lo:lo + size] = rng.dirichlet(np.full(size, 0.3), size=p)
    return probs


def _case(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    probs = {
        "tiny": lambda: _dense(rng, 2, 3, 5),
        "dense": lambda: _dense(rng, 8, 16, 64),
        "topk": lambda: _topk(rng, 16, 25, 256, 12),
        "topk_wide": lambda: _topk(rng, 32, 16, 512, 60),
        "few_codes": lambda: _topk(rng, 16, 25, 8, 3),  # ~50 positions per code: several ranking blocks
        "disjoint": lambda: _disjoint(rng, 6, 16, 48, 3),
        "single_code": lambda: np.ones((3, 4, 1), np.float32),
    }[name]()
    tokens = _sample_tokens(rng, probs)
    return tokens, probs


CASES = ["tiny", "dense", "topk", "topk_wide", "few_codes", "disjoint", "single_code"]


def _np_target_counts(prob_mean, n):
    """Largest remainders, written the plain way: float32 floor, then +1/-1 in a sorted loop."""
    scaled = prob_mean.astype(np.float32) * np.float32(n)
    base = np.floor(scaled)
    frac = scaled - base
    out = base.astype(np.int64)
    remainder = n - out.sum()
    if remainder > 0:
        for code in sorted(range(len(frac)), key=lambda c: (-frac[c], c))[:remainder]:
            out[code] += 1
    elif remainder < 0:
        for code in sorted(np.nonzero(out > 0)[0], key=lambda c: (frac[c], c))[:-remainder]:
            out[code] -= 1
    return out


def _replay_official(tokens, probs, trace, tol=1e-5):
    """Replays the official loop with our draws and checks every step against it.

    For each over-represented code in increasing order: rank its positions by mass on the codes under target
    now; each redraw must take the best remaining position (up to float ties, within `tol`), and its new code
    must be under target at that moment, with positive probability unless the restricted mass is zero.
    Returns the number of draws that fell back to uniform.
    """
    flat = tokens.reshape(-1)
    flat_probs = probs.reshape(flat.size, -1).astype(np.float64)
    target = np.asarray(trace["target"])
    counts = np.bincount(flat, minlength=target.size)
    shortage = np.maximum(target - counts, 0)
    excess = np.maximum(counts - target, 0)
    num_draws = int(trace["num_draws"])
    positions = np.asarray(trace["positions"])
    codes = np.asarray(trace["codes"])
    assert num_draws == excess.sum() == shortage.sum()
    assert np.all(positions[num_draws:] == -1) and np.all(codes[num_draws:] == -1)
    step, fallbacks = 0, 0
    for code in np.nonzero(excess)[0]:
        candidates = np.nonzero(flat == code)[0]
        scores = flat_probs[candidates][:, shortage > 0].sum(-1)
        remaining = dict(zip(candidates.tolist(), scores.tolist()))
        for _ in range(excess[code]):
            pos, new_code = int(positions[step]), int(codes[step])
            assert pos in remaining, f"step {step}: position {pos} does not hold code {code} or was drawn twice"
            assert remaining[pos] >= max(remaining.values()) - tol, f"step {step}: not the best-ranked position"
            del remaining[pos]
            assert shortage[new_code] > 0, f"step {step}: code {new_code} was not under target"
            restricted_mass = flat_probs[pos][shortage > 0].sum()
            if restricted_mass > 0:
                assert flat_probs[pos, new_code] > 0, f"step {step}: drew a zero-probability code"
            else:
                fallbacks += 1
            shortage[new_code] -= 1
            step += 1
    assert step == num_draws
    return fallbacks


@pytest.mark.parametrize("name", CASES)
def test_invariants_and_official_replay(name):
    tokens, probs = _case(name)
    new_tokens, trace = rs.resample_scale_with_trace(jax.random.key(7), tokens, probs)
    new_tokens = np.asarray(new_tokens)
    target = np.asarray(trace["target"])
    v = probs.shape[-1]
    counts = np.bincount(tokens.ravel(), minlength=v)
    excess = np.maximum(counts - target, 0)

    assert new_tokens.shape == tokens.shape and new_tokens.dtype == np.int32
    # 1. every code's count equals its target, and the targets are the largest-remainder counts of p̄
    np.testing.assert_array_equal(np.bincount(new_tokens.ravel(), minlength=v), target)
    assert target.sum() == tokens.size
    assert np.all(np.abs(target - tokens.size * probs.reshape(-1, v).mean(0)) < 1 + 1e-3)
    # 2. only positions that held over-represented codes changed
    changed = new_tokens != tokens
    assert np.all(excess[tokens[changed]] > 0)
    # 3. as many changed positions as total excess, and they are exactly the logged redraws
    assert changed.sum() == excess.sum() == int(trace["num_draws"])
    logged = np.asarray(trace["positions"])[: int(trace["num_draws"])]
    np.testing.assert_array_equal(np.sort(logged), np.nonzero(changed.ravel())[0])
    np.testing.assert_array_equal(new_tokens.ravel()[logged], np.asarray(trace["codes"])[: len(logged)])
    # 4. each new code was under target when drawn, and positions follow the official ranking
    fallbacks = _replay_official(tokens, probs, trace)
    if name == "disjoint":
        assert fallbacks > 0, "the zero-restricted-mass fallback was not exercised"


def test_adversarial_tokens_all_one_code():
    """Tokens far from their distributions (all code 0): the invariants still hold by construction."""
    rng = np.random.default_rng(3)
    probs = _topk(rng, 4, 9, 32, 5)
    tokens = np.zeros((4, 9), np.int32)
    new_tokens, trace = rs.resample_scale_with_trace(jax.random.key(0), tokens, probs)
    np.testing.assert_array_equal(np.bincount(np.asarray(new_tokens).ravel(), minlength=32), trace["target"])
    assert int(trace["num_draws"]) == 36 - int(trace["target"][0])
    _replay_official(tokens, probs, trace)


def test_ranking_ties_and_restricted_draw_distribution():
    """Equal ranking mass: the lowest flattened position goes first; its draw follows the restricted probs.

    Code 0 holds all 4 positions with target 2; codes 1 and 2 are one short each. Every position puts mass
    0.5 on {1, 2}, so positions 0 and 1 are redrawn; position 0 draws code 1 with probability 0.375/0.5.
    """
    rows = np.array([[0.5, 0.375, 0.125, 0.0], [0.5, 0.125, 0.375, 0.0]], np.float32)
    probs = np.stack([rows[0], rows[1], rows[0], rows[1]])[None]  # [1, 4, 4]; p̄ = [0.5, 0.25, 0.25, 0]
    tokens = np.zeros((1, 4), np.int32)
    keys = jax.random.split(jax.random.key(11), 2000)
    new_tokens = jax.vmap(lambda k: rs.resample_scale(k, tokens, probs))(keys)
    new_tokens = np.asarray(new_tokens)[:, 0]
    assert np.all(new_tokens[:, 2:] == 0), "positions 2, 3 lost the tie and must keep code 0"
    assert np.all(np.sort(new_tokens[:, :2], axis=1) == [1, 2])
    frequency = (new_tokens[:, 0] == 1).mean()
    assert abs(frequency - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 2000), frequency


def test_ranking_ties_across_blocks_follow_flattened_order():
    """100 identical positions of code 0, 50 in excess: positions 0..49 are redrawn, in that order."""
    probs = np.tile(np.array([0.5, 0.25, 0.25, 0.0], np.float32), (2, 50, 1))
    tokens = np.zeros((2, 50), np.int32)
    new_tokens, trace = rs.resample_scale_with_trace(jax.random.key(4), tokens, probs)
    assert int(trace["num_draws"]) == 50
    np.testing.assert_array_equal(np.asarray(trace["positions"])[:50], np.arange(50))
    assert np.all(np.asarray(new_tokens)[0] != 0) and np.all(np.asarray(new_tokens)[1] == 0)


def test_ranking_prefers_mass_on_under_codes():
    """The position with more mass on the under-represented code is the one redrawn."""
    probs = np.array([[[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [0.75, 0.0, 0.25], [1.0, 0.0, 0.0]]], np.float32)
    # p̄ = [0.75, 0.1875, 0.0625]: 4·p̄ = [3, 0.75, 0.25] → targets [3, 1, 0]; mass on {1}: [.25, .5, 0, 0]
    tokens = np.zeros((1, 4), np.int32)
    new_tokens, trace = rs.resample_scale_with_trace(jax.random.key(0), tokens, probs)
    np.testing.assert_array_equal(trace["target"], [3, 1, 0])
    np.testing.assert_array_equal(np.asarray(new_tokens), [[0, 1, 0, 0]])


def test_deterministic_per_key_and_keys_differ():
    tokens, probs = _case("topk")
    first = rs.resample_scale(jax.random.key(1), tokens, probs)
    again = rs.resample_scale(jax.random.key(1), tokens, probs)
    other = rs.resample_scale(jax.random.key(2), tokens, probs)
    np.testing.assert_array_equal(first, again)
    assert np.any(np.asarray(first) != np.asarray(other))


def test_runs_under_jit_and_matches_eager():
    tokens, probs = _case("dense")
    jitted = jax.jit(rs.resample_scale)(jax.random.key(5), jnp.asarray(tokens), jnp.asarray(probs))
    np.testing.assert_array_equal(jitted, rs.resample_scale(jax.random.key(5), tokens, probs))
    tokens_j, trace = jax.jit(rs.resample_scale_with_trace)(jax.random.key(5), tokens, probs)
    np.testing.assert_array_equal(tokens_j, jitted)
    assert int(trace["num_draws"]) > 0


def test_resample_scales_uses_one_key_per_scale():
    cases = [_case("tiny"), _case("dense"), _case("topk")]
    tokens, probs = [c[0] for c in cases], [c[1] for c in cases]
    key = jax.random.key(9)
    out = rs.resample_scales(key, tokens, probs)
    assert len(out) == 3
    for s, (t, p) in enumerate(cases):
        np.testing.assert_array_equal(out[s], rs.resample_scale(jax.random.fold_in(key, s), t, p))
    with pytest.raises(ValueError, match="token maps"):
        rs.resample_scales(key, tokens, probs[:2])


@pytest.mark.parametrize("v,n,alpha", [(7, 10, 1.0), (64, 1000, 0.2), (300, 4096, 0.05), (4096, 65536, 0.1)])
def test_target_counts_match_numpy(v, n, alpha):
    rng = np.random.default_rng(v)
    prob_mean = rng.dirichlet(np.full(v, alpha)).astype(np.float32)
    prob_mean[rng.random(v) < 0.3] = 0.0  # many zeros, as after top-k; the sum may now fall below 1
    prob_mean /= prob_mean.sum()
    got = np.asarray(rs.target_counts(jnp.asarray(prob_mean), n))
    np.testing.assert_array_equal(got, _np_target_counts(prob_mean, n))
    assert got.sum() == n and got.dtype == np.int32


def test_target_counts_ties_and_negative_remainder():
    # Equal fractional parts: 6 codes, n = 10 → floors 1, remainder 4 → the four lowest codes get one more.
    np.testing.assert_array_equal(rs.target_counts(jnp.full(6, 1 / 6, jnp.float32), 10), [2, 2, 2, 2, 1, 1])
    # Σp̄ > 1 (float rounding taken to the extreme): the surplus comes off the smallest fractional parts.
    prob_mean = np.array([0.25, 0.3, 0.25, 0.5], np.float32)  # floors of 4·p̄: [1, 1, 1, 2] = 5 > 4
    got = np.asarray(rs.target_counts(jnp.asarray(prob_mean), 4))
    np.testing.assert_array_equal(got, _np_target_counts(prob_mean, 4))
    np.testing.assert_array_equal(got, [0, 1, 1, 2])  # code 0: fraction 0, ties 2 and 3 → lowest code


def test_frequency_mismatch_before_and_after():
    tokens, probs = _case("topk_wide")
    v = probs.shape[-1]
    freq = np.bincount(tokens.ravel(), minlength=v) / tokens.size
    expected = 0.5 * np.abs(freq - probs.reshape(-1, v).mean(0)).sum()
    before = float(rs.frequency_mismatch(tokens, probs))
    np.testing.assert_allclose(before, expected, rtol=1e-5)
    after_tokens = rs.resample_scale(jax.random.key(0), tokens, probs)
    after = float(rs.frequency_mismatch(after_tokens, probs))
    assert after < before and after < v / (2 * tokens.size)
    per_scale = rs.frequency_mismatch_per_scale([tokens, after_tokens], [probs, probs])
    np.testing.assert_allclose(per_scale, [before, after], rtol=1e-6)


def test_bad_inputs_raise():
    tokens, probs = _case("tiny")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\[N, P\]"):
        rs.resample_scale(key, tokens.ravel(), probs)
    with pytest.raises(ValueError, match="tokens.shape"):
        rs.resample_scale(key, tokens, probs[:, :2])
    with pytest.raises(ValueError, match="integer"):
        rs.resample_scale(key, tokens.astype(np.float32), probs)
    with pytest.raises(ValueError, match="lie in"):
        rs.resample_scale(key, tokens + probs.shape[-1], probs)
    with pytest.raises(ValueError, match="sum to 1"):
        rs.resample_scale(key, tokens, probs * 2)
    bad = probs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        rs.resample_scale(key, tokens, bad)
    with pytest.raises(ValueError, match="1-D"):
        rs.target_counts(jnp.ones((2, 2)), 4)
