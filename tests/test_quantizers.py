"""Quantizers against the official Shift-and-Sum outputs (sas_quantizers.npz) and their defining properties.

Golden comparison: values agree to float32 precision, except that XLA computes x / Δ as x · (1/Δ), which can
move a value sitting within an ulp of a rounding boundary to the neighbouring code. Such elements may differ from
the reference by at most one quantization step, and at most 0.1% of a tensor's elements (at least 1) may do so.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax.quant import quantizers as Q

FIXTURES = os.environ.get("VARQ_QUANT_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures",
                                                              "sas_quantizers.npz"))
ATTENTION_KINDS = {"matmul_qk", "matmul_av_shift_and_sum"}      # covered by test_sas_attention.py
QUANTIZER_KINDS = {"weight_per_channel_minmax", "weight_group128_minmax", "act_per_token", "act_per_token_group64",
                   "act_per_token_signed_split", "act_per_token_group64_signed_split", "softmax_log2_per_row",
                   "v_shift_and_sum", "adaround_learned_hard_sigmoid"}


def _cases():
    z = np.load(FIXTURES)
    names = sorted({k.split("/")[0] for k in z.files if k.endswith("/meta_json")})
    return z, [(n, json.loads(str(z[n + "/meta_json"]))) for n in names]


def _range_step(x, axes, bits):
    """Min-max step per reduction set, as a reference-independent bound for one-step differences."""
    n = 2 ** bits
    return np.maximum((x.max(axes, keepdims=True) - x.min(axes, keepdims=True)) / (n - 1), 1e-6)


def _grouped_step(x, group, bits):
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    return np.broadcast_to(_range_step(g, -1, bits), g.shape).reshape(x.shape)


def _signed_step(x, bits, group=None):
    g = x if group is None else x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    half = 2 ** bits / 2 - 1
    step = np.maximum(np.maximum(-g.min(-1, keepdims=True), g.max(-1, keepdims=True)) / half, 1e-6)
    return np.broadcast_to(step, g.shape).reshape(x.shape)


def _run_weight(z, name, bits, group):
    x = z[name + "/x"]                                          # torch [out, in]; ours [in, out]
    out = np.asarray(Q.quantize_weight(x.T, bits, group)).T
    if group is None:
        step = _range_step(x, 1, bits)
    else:
        step = _grouped_step(x, group, bits)
    return {"out": (out, step)}


def _run_adaround(z, name, bits):
    w, alpha, delta, zp = (z[name + k].T for k in ("/x", "/x2", "/x3", "/x4"))
    hard = np.asarray(Q.adaround_weight(w, alpha, delta, zp, bits)).T
    soft = np.asarray(Q.adaround_weight(w, alpha, delta, zp, bits, soft=True)).T
    return {"out": (hard, np.broadcast_to(delta.T, hard.shape)), "out_soft": (soft, np.zeros(soft.shape))}


def _run(z, name, meta):
    kind, bits, x = meta["kind"], meta["bits"], z[name + "/x"]
    if kind == "weight_per_channel_minmax":
        return _run_weight(z, name, bits, None)
    if kind == "weight_group128_minmax":
        return _run_weight(z, name, bits, meta.get("group", 128))
    if kind == "act_per_token":
        return {"out": (np.asarray(Q.quantize_act_per_token(x, bits)), _range_step(x, -1, bits))}
    if kind == "act_per_token_group64":
        group = meta.get("group", 64)
        return {"out": (np.asarray(Q.quantize_act_per_group(x, bits, group)), _grouped_step(x, group, bits))}
    if kind == "act_per_token_signed_split":
        return {"out": (np.asarray(Q.quantize_act_signed_split(x, bits)), _signed_step(x, bits))}
    if kind == "act_per_token_group64_signed_split":
        group = meta.get("group", 64)
        return {"out": (np.asarray(Q.quantize_act_signed_split(x, bits, group)), _signed_step(x, bits, group))}
    if kind == "softmax_log2_per_row":
        out = np.asarray(Q.quantize_log2(x, bits))
        return {"out": (out, np.maximum(np.abs(out), np.abs(z[name + "/out"])))}   # one step: a factor of 2
    if kind == "v_shift_and_sum":                               # torch [B, H, L2, c]; ours [B, L2, H, c]
        orders = z[name + "/x2"].astype(np.int32).transpose(0, 2, 1)
        out = np.asarray(Q.quantize_v_shift_and_sum(x.transpose(0, 2, 1, 3), orders, bits)).transpose(0, 2, 1, 3)
        return {"out": (out, np.broadcast_to(_range_step(x, (2, 3), bits), x.shape))}
    if kind == "adaround_learned_hard_sigmoid":
        return _run_adaround(z, name, bits)
    raise KeyError(kind)


def _assert_matches(ours, ref, step, what):
    step = np.broadcast_to(step, ref.shape)
    atol = 1e-6 * max(float(np.abs(ref).max()), 1e-30)
    diff = np.abs(ours.astype(np.float64) - ref)
    off = diff > atol + 1e-5 * np.abs(ref)
    allowed = max(1, int(1e-3 * ref.size))
    assert off.sum() <= allowed, f"{what}: {off.sum()} of {ref.size} elements differ (max {diff.max():.3g})"
    assert np.all(diff[off] <= 1.001 * step[off] + atol), f"{what}: a difference exceeds one quantization step"


_Z, _CASES = _cases()


def test_fixture_kinds_are_all_covered():
    kinds = {meta["kind"] for _, meta in _CASES}
    assert kinds and kinds <= QUANTIZER_KINDS | ATTENTION_KINDS, kinds - QUANTIZER_KINDS - ATTENTION_KINDS


@pytest.mark.golden
@pytest.mark.parametrize("name,meta", [c for c in _CASES if c[1]["kind"] not in ATTENTION_KINDS],
                         ids=[c[0] for c in _CASES if c[1]["kind"] not in ATTENTION_KINDS])
def test_matches_official_quantizer(name, meta):
    results = _run(_Z, name, meta)
    for key, (ours, step) in results.items():
        ref = _Z[f"{name}/{key}"]
        assert ours.shape == ref.shape
        _assert_matches(ours, ref, np.asarray(step), f"{name}/{key}")


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------
def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True])
def test_bad_bits_raise(bits):
    x = _normal(0, (2, 4, 128))
    calls = [
        lambda: Q.quantize_act_per_token(x, bits),
        lambda: Q.quantize_act_per_group(x, bits),
        lambda: Q.quantize_act_signed_split(x, bits),
        lambda: Q.quantize_weight(x[0], bits),
        lambda: Q.quantize_q_operand(x, bits),
        lambda: Q.quantize_log2(x, bits),
        lambda: Q.weight_group_size(bits, 128),
        lambda: Q.act_quantizer(bits, 128),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="bits"):
            call()


def test_all_widths_2_to_8_use_their_levels():
    x = _normal(1, (3, 256))
    for bits in range(2, 9):
        out = np.asarray(Q.quantize_act_per_token(x, bits))
        assert all(len(np.unique(row)) <= 2 ** bits for row in out)
        assert max(len(np.unique(row)) for row in out) > 2 ** (bits - 1)


def test_weight_ste_gradient_is_identity_inside_the_range():
    kernel = _normal(2, (256, 8))
    delta, zp = Q.weight_minmax_params(kernel, 4, 128)
    wider = kernel * 1.5                                     # some entries now fall outside the stored range
    cot = _normal(3, wider.shape)
    grad = jax.grad(lambda w: jnp.sum(Q.fake_quant_weight(w, delta, zp, 4) * cot))(wider)
    code = np.round(np.asarray(wider).reshape(2, 128, 8) / np.asarray(delta)) + np.asarray(zp)
    inside = ((code >= 0) & (code <= 15)).reshape(wider.shape)
    assert 0 < inside.mean() < 1
    np.testing.assert_allclose(np.asarray(grad)[inside], np.asarray(cot)[inside], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~inside], 0.0)
    assert not np.any(np.asarray(jax.grad(lambda d: jnp.sum(Q.weight_minmax_params(kernel + d, 4)[0]))(
        jnp.zeros_like(kernel))))                          # stored parameters are constants


@pytest.mark.parametrize("quantize,group", [
    (functools.partial(Q.quantize_act_per_token, bits=4), 128),
    (functools.partial(Q.quantize_act_per_group, bits=4), 64),
    (functools.partial(Q.quantize_act_signed_split, bits=6), 128),
    (functools.partial(Q.quantize_act_signed_split, bits=4, group_size=64), 64),
])
def test_dynamic_ste_gradient_is_identity_away_from_the_range_ends(quantize, group):
    """Non-extreme elements get the cotangent unchanged; the range (Δ) stays differentiable, as in the
    reference, so only the per-token/group min and max also receive the Δ path."""
    x = _normal(4, (2, 3, 128))
    cot = _normal(5, x.shape)
    grad = np.asarray(jax.grad(lambda t: jnp.sum(quantize(t) * cot))(x))
    xs = np.asarray(x).reshape(2, 3, 128 // group, group)
    extreme = ((xs == xs.max(-1, keepdims=True)) | (xs == xs.min(-1, keepdims=True))).reshape(x.shape)
    np.testing.assert_allclose(grad[~extreme], np.asarray(cot)[~extreme], rtol=1e-6)
    assert np.all(np.abs(grad[extreme] - np.asarray(cot)[extreme]) > 1e-6)


def test_granularity_rules():
    assert Q.weight_group_size(4, 1024) == 128 and Q.act_group_size(4, 1024) == 64
    assert Q.weight_group_size(6, 1024) is None and Q.act_group_size(8, 1024) is None
    assert Q.weight_group_size(4, 32) is None and Q.act_group_size(4, 32) is None     # word_embed (Cvae 32)
    assert Q.weight_group_size(2, 192) is None and Q.act_group_size(2, 192) is None   # 192 % 128 ≠ 0
    x = _normal(6, (2, 5, 256))
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    same(Q.act_quantizer(4, 256)(x), Q.quantize_act_per_group(x, 4, 64))
    same(Q.act_quantizer(6, 256)(x), Q.quantize_act_per_token(x, 6))
    same(Q.act_quantizer(4, 256, signed_split=True)(x), Q.quantize_act_signed_split(x, 4, 64))
    same(Q.act_quantizer(4, 192, signed_split=True)(x[..., :192]), Q.quantize_act_signed_split(x[..., :192], 4))
    assert not np.array_equal(np.asarray(Q.quantize_act_per_group(x, 4)), np.asarray(Q.quantize_act_per_token(x, 4)))


def test_grouped_weight_equals_per_channel_on_each_group():
    kernel = _normal(7, (384, 16))
    grouped = np.asarray(Q.quantize_weight(kernel, 3, 128))
    for g in range(3):
        part = kernel[g * 128:(g + 1) * 128]
        np.testing.assert_array_equal(grouped[g * 128:(g + 1) * 128], np.asarray(Q.quantize_weight(part, 3)))
    with pytest.raises(ValueError, match="multiple"):
        Q.weight_minmax_params(kernel[:200], 4, 128)


def _max_distinct(x, axes):
    """Largest number of distinct values over the reduction sets spanned by `axes`."""
    moved = np.moveaxis(np.asarray(x), axes, list(range(-len(axes), 0)))
    flat = moved.reshape(-1, int(np.prod(moved.shape[-len(axes):])))
    return max(len(np.unique(r)) for r in flat)


def test_attention_operand_granularity():
    q = _normal(8, (2, 9, 3, 128))                          # [B, T, H, D], two groups of 64 channels
    k = _normal(9, (2, 200, 3, 128))                        # [B, S, H, D]
    # ≥6 bits: Q per token over D; K per (b, h, channel) over the tokens.
    assert _max_distinct(Q.quantize_q_operand(q, 6), [3]) <= 64
    assert _max_distinct(Q.quantize_k_operand(k, 6), [1]) <= 64
    assert _max_distinct(Q.quantize_k_operand(k, 6), [3]) > 64
    # <6 bits: both per token, groups of 64 channels.
    q2 = np.asarray(Q.quantize_q_operand(q, 2)).reshape(2, 9, 3, 2, 64)
    k2 = np.asarray(Q.quantize_k_operand(k, 2)).reshape(2, 200, 3, 2, 64)
    assert _max_distinct(q2, [4]) <= 4 and _max_distinct(k2, [4]) <= 4
    assert _max_distinct(q2, [3, 4]) > 4 and _max_distinct(k2, [3, 4]) > 4
    assert _max_distinct(Q.quantize_k_operand(k, 2), [1]) > 4
    with pytest.raises(ValueError, match="B, S, H, D"):
        Q.quantize_k_operand(k[0], 6)
    # head_dim ≤ 64 (the research default's 32): one group is the whole head, i.e. per token over D.
    q32, k32 = q[..., :32], k[..., :32]
    np.testing.assert_array_equal(Q.quantize_q_operand(q32, 4), Q.quantize_act_per_token(q32, 4))
    np.testing.assert_array_equal(Q.quantize_k_operand(k32, 4), Q.quantize_act_per_token(k32, 4))
    np.testing.assert_array_equal(Q.quantize_q_operand(q[..., :64], 4), Q.quantize_act_per_group(q[..., :64], 4, 64))


def test_log2_quantizer_codes():
    logits = np.asarray(_normal(10, (2, 3, 5, 50), 4.0), np.float64)
    p = jnp.asarray(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), jnp.float32)
    for bits in (2, 4, 8):
        out = np.asarray(Q.quantize_log2(p, bits))
        row_max = np.asarray(p).max(-1, keepdims=True)
        np.testing.assert_array_equal(out.max(-1, keepdims=True), row_max)
        nz = out > 0
        code = -np.log2(out[nz] / np.broadcast_to(row_max, out.shape)[nz])
        np.testing.assert_allclose(code, np.round(code), atol=1e-4)
        assert code.max() <= 2 ** bits - 1
        if bits == 2:
            assert not nz.all()                             # codes ≥ 4 become exactly zero


def _v_with_orders(order, seed=11):
    v = _normal(seed, (2, 30, 3, 64))
    return v, jnp.full(v.shape[:3], order, jnp.int32)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_shift_and_sum_error_bound_and_mse(bits):
    n = 2 ** bits
    errors = []
    for order in range(4):
        v, orders = _v_with_orders(order)
        out = np.asarray(Q.quantize_v_shift_and_sum(v, orders, bits))
        vn = np.asarray(v)
        delta = np.maximum((vn.max((1, 3), keepdims=True) - vn.min((1, 3), keepdims=True)) / (n - 1), 1e-6)
        zp = -np.round(vn.min((1, 3), keepdims=True) / delta)
        unclipped = (vn / delta + zp >= 0) & (vn / delta + zp <= n - 1)
        err = np.abs(out - vn)
        bound = np.broadcast_to(delta / 2 ** (order + 1), vn.shape)
        assert unclipped.mean() > 0.99
        assert np.all(err[unclipped] <= bound[unclipped] * (1 + 1e-4) + 1e-6)
        grid = (out / delta + zp) * 2 ** order                   # codes lie on a 2^order times finer grid
        np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
        errors.append(np.mean(err ** 2))
    assert errors[0] > errors[1] > errors[2] > errors[3]


def test_shift_and_sum_selects_order_per_token():
    v, _ = _v_with_orders(0, seed=12)
    orders = jnp.asarray(np.random.default_rng(13).integers(0, 4, v.shape[:3]), jnp.int32)
    mixed = np.asarray(Q.quantize_v_shift_and_sum(v, orders, 4))
    for k in range(4):
        alone = np.asarray(Q.quantize_v_shift_and_sum(v, jnp.full_like(orders, k), 4))
        sel = np.asarray(orders) == k
        np.testing.assert_array_equal(mixed[sel], alone[sel])
    grad = jax.grad(lambda t: jnp.sum(Q.quantize_v_shift_and_sum(t, orders, 4)))(v)
    np.testing.assert_allclose(np.median(np.asarray(grad)), 1.0, rtol=1e-6)   # straight-through in range


def test_shift_orders_equal_the_log2_rule():
    a = np.concatenate([np.random.default_rng(0).random(2000, np.float32) * 0.1,
                        np.float32([0.0, 0.01, 0.02, 0.04, 0.08, 0.0100001, 1.0])])
    for theta in (np.float32(0.01), np.float32(0.003)):
        with np.errstate(divide="ignore"):
            rule = np.clip(np.ceil(np.log2(a.astype(np.float64) / np.float64(theta))), 0, 3)
        np.testing.assert_array_equal(np.asarray(Q.shift_orders(a, theta)), rule)


def test_adaround_init_and_rounding():
    kernel = _normal(14, (256, 12))
    for group in (None, 128):
        delta, zp = Q.weight_minmax_params(kernel, 4, group)
        alpha = Q.adaround_init_alpha(kernel, delta)
        assert alpha.shape == kernel.shape
        groups = 1 if group is None else 256 // group
        scaled = np.asarray(kernel).reshape(groups, -1, 12) / np.asarray(delta).reshape(groups, 1, 12)
        code = (scaled + np.asarray(zp).reshape(groups, 1, 12)).reshape(kernel.shape)
        inside = (code >= 0) & (code <= 15)
        soft = np.asarray(Q.adaround_weight(kernel, alpha, delta, zp, 4, soft=True))
        np.testing.assert_allclose(soft[inside], np.asarray(kernel)[inside], atol=1e-5)   # h(α₀) = frac(w/Δ)
        hard = np.asarray(Q.adaround_weight(kernel, alpha, delta, zp, 4))
        nearest = np.asarray(Q.fake_quant_weight(kernel, delta, zp, 4))
        tie = (np.abs(scaled - np.floor(scaled) - 0.5) < 1e-4).reshape(kernel.shape)
        np.testing.assert_array_equal(hard[~tie], nearest[~tie])         # hard(α₀) = round to nearest
        grad = jax.grad(lambda a: jnp.sum(Q.adaround_weight(kernel, a, delta, zp, 4, soft=True)))(alpha)
        assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)
    with pytest.raises(ValueError, match="alpha shape"):
        Q.adaround_weight(kernel, alpha[:10], delta, zp, 4)


def test_adaround_regularizer():
    big = jnp.array([-20.0, 20.0, 30.0])
    assert float(Q.adaround_regularizer(big, 2.0)) == 0.0            # h ∈ {0, 1}: no penalty
    half = jnp.full((5,), -np.log(1.2 / 0.6 - 1))                      # sigmoid = 0.5 → h = 0.5
    np.testing.assert_allclose(float(Q.adaround_regularizer(half, 20.0)), 5.0, rtol=1e-6)
    mid = jnp.array([0.3])
    assert float(Q.adaround_regularizer(mid, 20.0)) > float(Q.adaround_regularizer(mid, 2.0))


def test_quantizers_jit_equal_eager():
    x = _normal(15, (2, 7, 256))
    for fn in (Q.quantize_act_per_token, Q.quantize_act_per_group, Q.quantize_act_signed_split):
        np.testing.assert_array_equal(np.asarray(jax.jit(fn, static_argnums=1)(x, 4)), np.asarray(fn(x, 4)))
