"""The quantized VAR: site switches, KV-cache semantics, jit, pre-quantized inference and integer codes.

Dynamic per-token activation quantizers amplify last-ulp float differences between differently shaped (or
jitted vs eager) computations into one-step code flips, so equalities that involve them are checked with the
activation quantizers off (they act per token and cannot change semantics between the paths); everything
else — weights, QKᵀ operands, log2 probabilities, shift-and-sum V over exactly the visible keys — is exact.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax import sampling
from varq_jax.models import zoo
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import export, state
from varq_jax.quant.policy import QuantPolicy

VAE_CFG, VAR_CFG = zoo.tiny((1, 2, 3, 4))
POLICY = QuantPolicy(w_bits=4, a_bits=6)
SC = sampling.SamplingConfig(1.5, 16, 0.9)


@pytest.fixture(scope="module")
def model(tiny_params):
    p = tiny_params                                # init_params(VAE_CFG, VAR_CFG, PRNGKey(0)), made once per run
    q = state.set_theta(state.init_quant_state(p["var"], POLICY), 0.05)   # θ small: orders 1..3 occur
    toks = [jax.random.randint(jax.random.PRNGKey(i), (2, pn * pn), 0, VAR_CFG.vocab_size)
            for i, pn in enumerate(VAR_CFG.patch_nums)]
    x = VQVAE(VAE_CFG).apply({"params": p["vae"]}, toks, method=VQVAE.idx_to_var_input)
    return p, q, toks, x


def _tf_logits(policy, p, q, labels, x):
    v = {"params": p["var"]} if policy is None else {"params": p["var"], "quant": q}
    return VAR(VAR_CFG, jnp.float32, policy).apply(v, labels, x)


def test_switching_every_site_off_is_full_precision(model):
    p, q, _, x = model
    labels = jnp.array([1, 2])
    fp = _tf_logits(None, p, q, labels, x)
    for pol in (dataclasses.replace(POLICY, weights=False, acts=False, attn=False),
                dataclasses.replace(POLICY, fp_modules=("*",))):
        np.testing.assert_allclose(_tf_logits(pol, p, q, labels, x), fp, atol=2e-5)
    outs = {}
    for site in ("weights", "acts", "attn"):
        pol = dataclasses.replace(POLICY, **{s: s == site for s in ("weights", "acts", "attn")})
        outs[site] = _tf_logits(pol, p, q, labels, x)
        assert float(jnp.abs(outs[site] - fp).max()) > 1e-3, site
    head_fp = dataclasses.replace(POLICY, weights=True, acts=False, attn=False, fp_modules=("head",))
    assert not np.allclose(_tf_logits(head_fp, p, q, labels, x), outs["weights"], atol=1e-5)


def test_cached_sampling_equals_teacher_forced(model):
    p, q, toks, x = model
    pol = dataclasses.replace(POLICY, acts=False)
    labels = jnp.array([3, 4])
    b, pn = 2, VAR_CFG.patch_nums[-1]
    _, _, logged = sampling.generate(VQVAE(VAE_CFG), VAR(VAR_CFG, jnp.float32, pol), SC, p, q, labels,
                                     jax.random.split(jax.random.PRNGKey(0), b), toks, jnp.ones((b, pn, pn)),
                                     collect_logits=True)
    tf = _tf_logits(pol, p, q, jnp.concatenate([labels, jnp.full(b, VAR_CFG.num_classes)]),
                    jnp.concatenate([x, x]))
    for si, (s, e) in enumerate(VAR_CFG.begin_ends):
        t = SC.cfg * si / (VAR_CFG.num_scales - 1)
        np.testing.assert_allclose(logged[si][0], (1 + t) * tf[:b, s:e] - t * tf[b:, s:e], atol=2e-5,
                                   err_msg=f"scale {si}")
    # Shift-and-sum really is active: a huge θ (all orders 0) changes the logits.
    q_off = state.set_theta(q, 1e6)
    assert not np.allclose(_tf_logits(pol, p, q_off, jnp.array([3, 4]), x), tf[:b], atol=1e-4)


def test_scanned_and_unrolled_blocks_agree(model):
    """The sampler scans the blocks (or unrolls them on request); both compute the same."""
    p, q, toks, _ = model
    b, pn = 2, VAR_CFG.patch_nums[-1]
    outs = []
    pol = dataclasses.replace(POLICY, acts=False)
    for scan in (True, False):
        _, _, logged, sown = sampling.generate(VQVAE(VAE_CFG), VAR(VAR_CFG, jnp.float32, pol.for_inference()), SC, p,
                                               q, jnp.array([3, 4]), jax.random.split(jax.random.PRNGKey(0), b), toks,
                                               jnp.ones((b, pn, pn)), collect_logits=True, collect_intermediates=True,
                                               scan_blocks=scan)
        outs.append((logged, sown))
    for (g1, _), (g2, _) in zip(outs[0][0], outs[1][0]):
        np.testing.assert_allclose(g1, g2, atol=2e-5)
    m1 = outs[0][1][-1]["blocks_1"]["attn"]["attn_mean"][0]
    m2 = outs[1][1][-1]["blocks_1"]["attn"]["attn_mean"][0]
    np.testing.assert_allclose(m1, m2, atol=1e-6)


def test_jit_equals_eager(model):
    p, q, _, x = model
    labels = jnp.array([1, 2])
    fp = _tf_logits(None, p, q, labels, x)
    for pol in (dataclasses.replace(POLICY, acts=False, attn=False), POLICY):
        f = lambda pv, qv, l, xv: VAR(VAR_CFG, jnp.float32, pol).apply({"params": pv, "quant": qv}, l, xv)
        eager, jitted = f(p["var"], q, labels, x), jax.jit(f)(p["var"], q, labels, x)
        if not (pol.acts or pol.attn):
            np.testing.assert_allclose(eager, jitted, atol=2e-5)
        else:
            # Code flips from last-ulp differences (see module docstring) make the two differ a little; a real
            # difference in what is quantized would be as large as the quantization error itself.
            diff, qerr = float(jnp.linalg.norm(eager - jitted)), float(jnp.linalg.norm(eager - fp))
            assert diff < 0.25 * qerr, (diff, qerr)


def test_prequantized_weights_equal_on_the_fly(model):
    p, q, _, x = model
    pol = dataclasses.replace(POLICY, acts=False)
    inf = pol.for_inference()
    assert inf.weights_prequantized
    w_hat, q_inf = inf.prepare_params(p["var"], q)
    np.testing.assert_allclose(_tf_logits(inf, {"var": w_hat}, q_inf, jnp.array([1, 2]), x),
                               _tf_logits(pol, p, q, jnp.array([1, 2]), x), atol=2e-5)


def test_integer_codes_round_trip_and_size(model):
    p, q, _, _ = model
    rest, codes, sites = export.export_codes(p["var"], q, POLICY)
    shapes = {k: np.shape(v["kernel"]) for k, v in _linear_nodes(p["var"]).items()}
    assert {k: tuple(v["shape"]) for k, v in sites.items()} == shapes
    back = export.import_codes(rest, codes, q, sites)
    want = state.materialize_weights(p["var"], q, POLICY)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    n_weights = sum(int(np.prod(s)) for s in shapes.values())
    assert sum(c.nbytes for c in codes.values()) == sum((int(np.prod(s)) + 1) // 2 for s in shapes.values())
    assert sum(c.nbytes for c in codes.values()) * 4 <= n_weights * 2 + 4 * len(codes)     # ≈ 4× below bf16


def _linear_nodes(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            if "kernel" in v and np.ndim(v["kernel"]) == 2:
                out["/".join(prefix + (k,))] = v
            out.update(_linear_nodes(v, prefix + (k,)))
    return out


@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(a_bits=9), dict(phase="stochastic")])
def test_bad_policy(kw):
    with pytest.raises(ValueError):
        QuantPolicy(**kw)


def test_quantized_operands_enter_16_bit_matmuls_in_the_operand_dtype():
    """operand_dtype=float16 in a bfloat16 program: ŵ (and x̂) cast to float16 and accumulated in float32 — the
    official fp16 autocast for quantized Linears; 'auto' is that on GPUs only (TPU/CPU keep the compute dtype)."""
    from varq_jax.models.var import Dense
    from varq_jax.quant import quantizers
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(32, 16)) * 0.1, jnp.float32)
    outs = {}
    for operand in ("float16", "auto", "bfloat16"):
        policy = QuantPolicy(w_bits=8, a_bits=8, acts=False, operand_dtype=operand)     # weight-only: x stays x
        layer = Dense(16, "fc1", use_bias=False, dtype=jnp.bfloat16, out_dtype=jnp.float32, policy=policy)
        quant = state.init_quant_state({"fc1": {"kernel": kernel}}, policy)["fc1"]
        outs[operand] = np.asarray(layer.apply({"params": {"kernel": kernel}, "quant": quant}, x))
    w_hat = quantizers.fake_quant_weight(kernel, quant["delta"], quant["zero_point"], 8)
    as_ = lambda a, t: np.asarray(jnp.asarray(a).astype(t).astype(jnp.float32), np.float64)
    for operand, t in (("float16", jnp.float16), ("bfloat16", jnp.bfloat16)):
        np.testing.assert_allclose(outs[operand], as_(x, t) @ as_(w_hat, t), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs["auto"], outs["float16" if jax.default_backend() == "gpu" else "bfloat16"])
    assert np.abs(outs["float16"] - outs["bfloat16"]).max() > 1e-3      # bf16 rounds ŵ visibly coarser
    assert QuantPolicy(operand_dtype="float16").operands(jnp.float32) == jnp.float32    # float32 stays float32
    with pytest.raises(ValueError, match="operand_dtype must be one of"):
        QuantPolicy(operand_dtype="float8")
