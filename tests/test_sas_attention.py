"""Shift-and-sum attention against the official QuantMatMul outputs, and its semantics.

The golden matmul cases are compared to float32 precision with no allowance for rounding-boundary flips: a flip in
one operand element would move a whole row or column of the product, and the shipped fixture has none.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax.models.var import attention as fp_attention
from varq_jax.quant import quantizers as Q
from varq_jax.quant.sas_attention import attend_values, attention_logits, sas_attention

FIXTURES = os.environ.get("VARQ_QUANT_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures",
                                                              "sas_quantizers.npz"))


def _cases(kind):
    z = np.load(FIXTURES)
    names = sorted({k.split("/")[0] for k in z.files if k.endswith("/meta_json")})
    metas = {n: json.loads(str(z[n + "/meta_json"])) for n in names}
    return z, [(n, m) for n, m in metas.items() if m["kind"] == kind]


_Z, _QK = _cases("matmul_qk")
_, _AV = _cases("matmul_av_shift_and_sum")


def _close(ours, ref):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.golden
@pytest.mark.parametrize("name,meta", _QK, ids=[n for n, _ in _QK])
def test_matmul_qk_matches_official(name, meta):
    a = _Z[name + "/x"].transpose(0, 2, 1, 3)                  # q·scale [B,H,L1,c] → [B,L1,H,c]
    k = _Z[name + "/x2"].transpose(0, 3, 1, 2)                 # Kᵀ [B,H,c,L2] → [B,L2,H,c]
    _close(np.asarray(attention_logits(a, k, meta["bits"])), _Z[name + "/out"])


@pytest.mark.golden
@pytest.mark.parametrize("name,meta", _AV, ids=[n for n, _ in _AV])
def test_matmul_av_shift_and_sum_matches_official(name, meta):
    probs = _Z[name + "/x"]                                    # [B,H,L1,L2], our layout too
    v = _Z[name + "/x2"].transpose(0, 2, 1, 3)                 # [B,H,L2,c] → [B,L2,H,c]
    out, attn_mean = attend_values(probs, v, meta["bits"], meta["theta"])
    _close(np.asarray(out).transpose(0, 2, 1, 3), _Z[name + "/out"])
    np.testing.assert_allclose(np.asarray(attn_mean), probs.mean(2), rtol=1e-6)
    plain, _ = attend_values(probs, v, meta["bits"], meta["theta"], shift_and_sum=False)
    assert not np.allclose(np.asarray(plain), np.asarray(out), rtol=1e-5, atol=1e-6)   # the orders matter


def _qkv(seed, b=2, t=9, s=14, h=3, d=64, spread=3.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)) * spread / np.sqrt(d)
    k = rng.standard_normal((b, s, h, d))
    v = rng.standard_normal((b, s, h, d))
    return (jnp.asarray(x, jnp.float32) for x in (q, k, v))


def test_jit_equals_eager_and_theta_may_be_traced():
    q, k, v = _qkv(0)
    eager_out, eager_mean = sas_attention(q, k, v, 0.5, a_bits=4, theta=0.05)
    fn = jax.jit(lambda q, k, v, theta: sas_attention(q, k, v, 0.5, a_bits=4, theta=theta))
    jit_out, jit_mean = fn(q, k, v, jnp.float32(0.05))
    np.testing.assert_array_equal(np.asarray(jit_out), np.asarray(eager_out))
    np.testing.assert_array_equal(np.asarray(jit_mean), np.asarray(eager_mean))
    assert eager_out.shape == q.shape and eager_mean.shape == (2, 3, 14)


def test_composition_and_orders_from_fp_probabilities():
    """out = log2(P) · SAS(V, orders of mean FP P) with P = softmax(Q̂K̂ᵀ); orders from the quantized P differ."""
    q, k, v = _qkv(1, spread=8.0)
    scale, theta, bits = 0.7, 0.08, 4
    out, attn_mean = sas_attention(q, k, v, scale, a_bits=bits, theta=theta)
    logits = jnp.einsum("bthd,bshd->bhts", Q.quantize_q_operand(q * scale, bits), Q.quantize_k_operand(k, bits))
    probs = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(np.asarray(attn_mean), np.asarray(probs.mean(2)), rtol=1e-5, atol=1e-7)

    def compose(orders):
        v_hat = Q.quantize_v_shift_and_sum(v, jnp.swapaxes(orders, 1, 2), bits)
        return np.asarray(jnp.einsum("bhts,bshd->bthd", Q.quantize_log2(probs, bits), v_hat))

    fp_orders = Q.shift_orders(probs.mean(2), theta)
    q_orders = Q.shift_orders(Q.quantize_log2(probs, bits).mean(2), theta)
    assert np.any(np.asarray(fp_orders) != np.asarray(q_orders))
    np.testing.assert_allclose(np.asarray(out), compose(fp_orders), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(out), compose(q_orders), rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.asarray(fp_orders))) > 1


def test_switches():
    q, k, v = _qkv(2)
    fp = np.asarray(fp_attention(q, k, v, 0.5))
    off, mean = sas_attention(q, k, v, 0.5, a_bits=4, quantize_qk=False, quantize_av=False)
    np.testing.assert_allclose(np.asarray(off), fp, rtol=1e-5, atol=1e-6)
    qk_only, _ = sas_attention(q, k, v, 0.5, a_bits=4, quantize_av=False)
    assert not np.allclose(np.asarray(qk_only), fp, atol=1e-4)
    no_sas, _ = sas_attention(q, k, v, 0.5, a_bits=4, shift_and_sum=False)
    huge_theta, _ = sas_attention(q, k, v, 0.5, a_bits=4, theta=2.0)     # ā ≤ 1 < θ: every order is 0
    np.testing.assert_array_equal(np.asarray(no_sas), np.asarray(huge_theta))
    with_sas, _ = sas_attention(q, k, v, 0.5, a_bits=4, theta=0.01)
    assert not np.array_equal(np.asarray(with_sas), np.asarray(no_sas))


def test_shift_and_sum_reduces_error_of_attention_output():
    q, k, v = _qkv(3, t=16, s=30)
    fp = np.asarray(fp_attention(q, k, v, 1.0))
    err = lambda theta: np.mean((np.asarray(sas_attention(q, k, v, 1.0, a_bits=4, theta=theta,
                                                          quantize_qk=False)[0]) - fp) ** 2)
    assert err(0.001) < err(10.0)


def test_bad_inputs_raise():
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="theta"):
        sas_attention(q, k, v, 1.0, a_bits=4)
    with pytest.raises(ValueError, match="positive"):
        sas_attention(q, k, v, 1.0, a_bits=4, theta=0.0)
    with pytest.raises(ValueError, match="bits"):
        sas_attention(q, k, v, 1.0, a_bits=9, theta=0.1)
    with pytest.raises(ValueError, match="B,S,H,D"):
        sas_attention(q, k, v[:, :5], 1.0, a_bits=4, theta=0.1)
    with pytest.raises(ValueError, match="disagree"):
        sas_attention(q[:, :, :2], k, v, 1.0, a_bits=4, theta=0.1)


@pytest.mark.parametrize("shape, bits, switches", [
    ((2, 9, 14, 2, 32), 8, (True, True, True)),       # one tile each way: a 3×3 scale seeing 14 keys
    ((2, 9, 14, 2, 32), 4, (True, True, False)),      # plain V rounding, A4 (groups of 64 are the head)
    ((1, 70, 100, 2, 64), 6, (True, True, True)),     # two query and two key tiles, both partial
    ((1, 70, 100, 2, 64), 6, (False, False, False)),  # FP attention through the kernels
])
def test_the_attention_kernels_give_the_xla_attention(shape, bits, switches):
    """attn_kernel's three passes (interpret mode) against the XLA path: the output and ā within float32 rounding
    of the reordered sums, no log2 code flipped at these sizes."""
    b, t, s, h, d = shape
    ks = jax.random.split(jax.random.PRNGKey(t), 3)
    q, k, v = (jax.random.normal(key, (b, n, h, d)) for key, n in zip(ks, (t, s, s)))
    qk, av, sas = switches
    kw = dict(a_bits=bits, theta=0.02, quantize_qk=qk, quantize_av=av, shift_and_sum=sas)
    ref, ref_mean = sas_attention(q, k, v, d ** -0.5, **kw)
    got, got_mean = sas_attention(q, k, v, d ** -0.5, kernel="pallas", interpret=True, **kw)
    assert got.shape == ref.shape and got_mean.shape == ref_mean.shape == (b, h, s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(got_mean), np.asarray(ref_mean), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="attention kernel must be xla or pallas"):
        sas_attention(q, k, v, d ** -0.5, kernel="triton", **kw)
