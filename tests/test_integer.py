"""Integer execution: integer codes and int32 products give the simulation's Linears, on every preset's sites.

The product of one Linear is checked against the fake-quant simulation (x̂·ŵ in float32) for every site of every
preset, through XLA and through the Pallas kernel in interpret mode. Whole-model comparisons with quantized
activations are bounded relative to the quantization error: per-token activation quantizers turn last-ulp float
differences into one-step code flips (test_quant_policy's docstring), so only weight-only execution is compared
for equality.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ptq as ptq_configs
from varq_jax import checkpoint, default_model, sampling
from varq_jax.models import zoo
from varq_jax.models.build import init_params
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import execution, export, integer, quantizers, registry, rules, state
from varq_jax.quant.pipeline import policy_from_config
from varq_jax.quant.policy import QuantPolicy

PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a6": (4, 6), "w4a4": (4, 4)}
VAE_CFG, VAR_CFG = zoo.tiny((1, 2))
VAR_CFG = dataclasses.replace(VAR_CFG, depth=1)          # one block: every site kind, a quick compile
SC = sampling.SamplingConfig(1.5, 16, 0.9)


def forward(cfg, policy, variables, labels, x):
    """Teacher-forced logits, jitted (eager Flax compiles op by op)."""
    return jax.jit(lambda v: VAR(cfg, jnp.float32, policy).apply(v, labels, x))(variables)


def rms(a) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(a))))


def preset_policy(name: str, method: str = "full") -> QuantPolicy:
    return policy_from_config(ptq_configs.make(*PRESETS[name], method))


@pytest.fixture(scope="module")
def tiny():
    return init_params(VAE_CFG, VAR_CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def teacher_forced(tiny):
    """(labels, next-scale inputs, FP logits) of two random token pyramids, shared by the preset tests."""
    toks = [jax.random.randint(jax.random.PRNGKey(i), (2, pn * pn), 0, VAR_CFG.vocab_size)
            for i, pn in enumerate(VAR_CFG.patch_nums)]
    x = VQVAE(VAE_CFG).apply({"params": tiny["vae"]}, toks, method=VQVAE.idx_to_var_input)
    labels = jnp.array([1, 2])
    return labels, x, forward(VAR_CFG, None, {"params": tiny["var"]}, labels, x)


def _site_product(rule, site, k, n, rng, kernel):
    """(integer result, the simulation's x̂·ŵ) of one Linear with random weights and inputs."""
    w = rng.randn(k, n).astype(np.float32) * 0.05
    x = rng.randn(24, k).astype(np.float32)
    if site == "fc2":
        x = np.asarray(jax.nn.gelu(x))
    d, z = quantizers.weight_minmax_params(w, rule.w_bits, rule.weight_group(k))
    form = integer.weight_form(integer.plan(rule, site, k), state.integer_codes(w, {"delta": d, "zero_point": z},
                                                                              rule.w_bits, False), d, z)
    name, group = rule.act_spec(site, k)
    x_hat = registry.act_quantizer(name).fn(jnp.asarray(x), rule.a_bits, group, None)
    sim = jnp.dot(x_hat, quantizers.fake_quant_weight(w, d, z, rule.w_bits), precision="highest")
    got = integer.dense(integer.plan(rule, site, k), jnp.asarray(x), form, None, jnp.float32, kernel=kernel,
                        interpret=True, act=kernel)
    return np.asarray(got), np.asarray(sim)


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_every_presets_linears_equal_the_simulation(kernel):
    """Each distinct (rule, site shape) of the five presets — per-channel × per-token, group-128 weights, group-64
    activations, fc2's signed split, the 32-input word_embed — at d16-like widths scaled down; 'pallas' makes the
    activation codes with the Pallas kernel too."""
    rng = np.random.RandomState(0)
    seen = set()
    for name in PRESETS:
        policy = preset_policy(name)
        for s in rules.model_sites(zoo.tiny()[1]):
            if s.kind != rules.LINEAR:
                continue
            rule = policy.rule_for(s.path)
            k = 256 if s.in_features >= 128 else s.in_features      # ≥ 2 groups of 128 where the site has groups
            key = (rule.w_bits, rule.a_bits, s.name == "fc2", k)
            if key in seen:
                continue
            seen.add(key)
            got, sim = _site_product(rule, s.name, k, 64, rng, kernel)
            np.testing.assert_allclose(got, sim, rtol=0, atol=2e-6 * np.abs(sim).max(), err_msg=f"{name} {s.path}")
    assert len(seen) >= 10


@pytest.mark.parametrize("plan", [
    integer.Plan(384, 8, 384, 8, 384, "per_token"),        # W8A8: one block, three loads per row
    integer.Plan(384, 4, 128, 6, 384, "per_token"),        # W4A6: three K-blocks in one activation group
    integer.Plan(256, 4, 128, 4, 64, "per_group"),         # W4A4: group-64 activations
    integer.Plan(512, 4, 128, 6, 512, "signed_split"),     # fc2 at W4A6
    integer.Plan(384, 8, 384, 8, 384, "signed_split"),     # fc2 at W8A8
    integer.Plan(1920, 8, 1920, 8, 1920, "per_token"),     # d30's width: a block that is not a power of two
], ids=lambda p: f"{p.coder}-k{p.in_features}-w{p.w_bits}g{p.w_group}-a{p.a_bits}g{p.a_group}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_activation_kernel_makes_the_xla_codes(plan, dtype):
    """Codes, scales, zero points and row sums bit for bit (interpret mode), with rows that are not a multiple of
    the kernel's tile, a constant row and an all-zero row (Δ at its floor)."""
    from varq_jax.quant import act_kernel
    x = np.random.RandomState(plan.in_features + plan.a_group).randn(37, plan.in_features).astype(np.float32)
    x[3], x[4] = 0.7, 0.0
    x = jnp.asarray(x * 3, dtype)
    got = act_kernel.act_codes(plan, x, interpret=True)
    want = integer.act_codes(plan, x)
    for name, g, w in zip(("codes", "scale", "zero", "row sums"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    with pytest.raises(ValueError, match="inputs have 100 channels"):
        act_kernel.act_codes(plan, x[:, :100], interpret=True)


def test_the_kernels_rounding_is_jnp_round():
    """pallas_triton.round_even (the kernels' rounding: Triton has no lax.round) equals jnp.round, ties to even."""
    from varq_jax.quant.pallas_triton import round_even
    ties = np.arange(-8, 8) + 0.5
    x = np.concatenate([ties, np.nextafter(ties, 0), np.nextafter(ties, 100),
                        np.random.RandomState(0).randn(10000) * 300, [3e7, -3e7, 2.0 ** 23 + 1, 0.0, -0.0]])
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_array_equal(np.asarray(round_even(x)), np.asarray(jnp.round(x)))


def test_codes_pack_two_per_byte_and_round_trip():
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.randint(-8, 8, (256, 16)), jnp.int8)
    packed = integer.pack(q, 128)
    assert packed.shape == (128, 16) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(integer.unpack(packed, 128), q)
    with pytest.raises(ValueError, match="do not nest"):
        rule = QuantPolicy(w_bits=4, a_bits=4, rules=({"pattern": "blocks_0/ffn/fc1", "a_group": 96},)).rule_for(
            "blocks_0/ffn/fc1")
        integer.plan(rule, "fc1", 384)


def test_w4_linears_hold_under_0_3_of_their_bf16_bytes(tiny):
    """Codes two per byte + Δ (float32) + zero points (int8) + column sums (int16) per group of 128 inputs; the
    float kernels of coded Linears are gone from the params."""
    policy = preset_policy("w4a6", "baseline")
    params, iq = execution.integer_model(tiny["var"], state.init_quant_state(tiny["var"], policy), policy)
    coded = bf16 = 0
    for s in rules.model_sites(VAR_CFG):
        if s.kind == rules.LINEAR and s.in_features % 128 == 0:
            node = iq
            for part in s.path.split("/"):
                node = node[part]
            coded += integer.weight_bytes(node)
            bf16 += 2 * s.in_features * s.out_features
    assert 0 < coded <= 0.3 * bf16, (coded, bf16)
    assert not any("kernel" in node for node in params["blocks_0"]["ffn"].values())
    assert execution.model_bytes(params, iq)["coded_linears"] >= coded


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_presets_forward_is_near_the_simulation(tiny, teacher_forced, name):
    policy = dataclasses.replace(preset_policy(name), phase="nearest")
    quant = state.set_theta(state.init_quant_state(tiny["var"], policy), 0.05)
    int_policy = execution.IntegerPolicy.of(policy).check(VAR_CFG)
    params, iq = int_policy.prepare_params(tiny["var"], quant)
    labels, x, fp = teacher_forced
    sim = forward(VAR_CFG, policy, {"params": tiny["var"], "quant": quant}, labels, x)
    got = forward(VAR_CFG, int_policy, {"params": params, "quant": iq}, labels, x)
    assert rms(got - sim) <= 0.75 * rms(sim - fp), (rms(got - sim), rms(sim - fp))
    # kernel='dequant': the same integer model through the simulation's arithmetic — its logits, from the codes
    # (bit for bit on the CPU with jax 0.10; the bound leaves room for another fusion order)
    dequant = forward(VAR_CFG, dataclasses.replace(int_policy, kernel="dequant"), {"params": params, "quant": iq},
                      labels, x)
    np.testing.assert_allclose(np.asarray(dequant), np.asarray(sim), rtol=0, atol=1e-6 * rms(sim))


def test_the_attention_kernels_run_the_models_quantized_attention(tiny, teacher_forced):
    """IntegerPolicy(attn_kernel='pallas'): every scale block's attention through attn_kernel (interpret mode) —
    teacher-forced logits of W4A6 shift-and-sum within float32 rounding of the XLA attention's."""
    policy = dataclasses.replace(preset_policy("w4a6"), phase="nearest")
    quant = state.set_theta(state.init_quant_state(tiny["var"], policy), 0.05)
    labels, x, _ = teacher_forced
    logits = []
    for attn in ("xla", "pallas"):
        p = execution.IntegerPolicy.of(policy, attn_kernel=attn, interpret=True).check(VAR_CFG)
        params, iq = p.prepare_params(tiny["var"], quant)
        logits.append(forward(VAR_CFG, p, {"params": params, "quant": iq}, labels, x))
    assert rms(logits[1] - logits[0]) <= 1e-4 * rms(logits[0]), (rms(logits[1] - logits[0]), rms(logits[0]))


def test_one_sampling_call_runs_every_presets_sites_in_integers(tiny):
    """A mixed table with each preset's settings at some site (W8A8 qkv, W6A6 proj, W4A4 fc1, W4A6 fc2's signed
    split, W4A8 head): one compiled sampler, valid tokens near the simulation's."""
    mixed = QuantPolicy(w_bits=4, a_bits=6, rules=(
        {"pattern": "*/mat_qkv", "w_bits": 8, "a_bits": 8}, {"pattern": "*/proj", "w_bits": 6, "a_bits": 6},
        {"pattern": "*/fc1", "w_bits": 4, "a_bits": 4}, {"pattern": "head", "w_bits": 4, "a_bits": 8}))
    quant = state.set_theta(state.init_quant_state(tiny["var"], mixed), 0.05)
    sampler = sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, mixed, execution="int")
    params, iq = sampler.prepare(tiny, quant)
    images, tokens = sampler(params, np.arange(4), jax.random.PRNGKey(0), quant=iq)
    assert np.isfinite(np.asarray(images)).all() and images.shape[0] == 4
    assert all(((t >= 0) & (t < VAR_CFG.vocab_size)).all() for t in tokens)
    plans = {integer.plan(mixed.rule_for(s.path), s.name, s.in_features) for s in rules.model_sites(VAR_CFG)
             if s.kind == rules.LINEAR}
    assert {(p.w_bits, p.a_bits, p.coder) for p in plans} >= {(8, 8, "per_token"), (6, 6, "per_token"),
                                                              (4, 4, "per_group"), (4, 6, "signed_split"),
                                                              (4, 8, "per_token")}


def test_weight_only_integer_execution_gives_identical_tokens(tiny):
    policy = QuantPolicy(w_bits=4, a_bits=6, acts=False)
    quant = state.set_theta(state.init_quant_state(tiny["var"], policy), 0.05)
    labels, key = np.array([1, 2, 3]), jax.random.PRNGKey(5)
    sim = sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, policy)(tiny, labels, key, quant=quant)
    integer_sampler = sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, policy, execution="int")
    params, iq = integer_sampler.prepare(tiny, quant)
    assert execution.is_integer(iq) and "kernel" not in params["var"]["blocks_0"]["ffn"]["fc1"]
    got = integer_sampler(params, labels, key, quant=iq)
    for a, b in zip(got[1], sim[1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got[0], sim[0])


def test_default_model_w4a6_logits_are_near_the_simulation():
    """Bounded by half the quantization error: the simulation itself moves by 0.36 of it between its jitted and
    eager evaluation on this model (code flips of per-token quantizers; measured 2026-12-02)."""
    ck = default_model.load_model()
    cfg = ck.var_cfg
    policy = dataclasses.replace(preset_policy("w4a6", "baseline"), shift_and_sum=True)
    quant = state.set_theta(state.init_quant_state(ck.params["var"], policy), 0.02)
    int_policy = execution.IntegerPolicy.of(policy)
    params, iq = int_policy.prepare_params(ck.params["var"], quant)
    toks = [jax.random.randint(jax.random.PRNGKey(i), (4, pn * pn), 0, cfg.vocab_size)
            for i, pn in enumerate(cfg.patch_nums)]
    x = VQVAE(ck.vae_cfg).apply({"params": ck.params["vae"]}, toks, method=VQVAE.idx_to_var_input)
    labels = jnp.arange(4) % cfg.num_classes
    fp = forward(cfg, None, {"params": ck.params["var"]}, labels, x)
    sim = forward(cfg, policy, {"params": ck.params["var"], "quant": quant}, labels, x)
    got = forward(cfg, int_policy, {"params": params, "quant": iq}, labels, x)
    assert rms(got - sim) <= 0.5 * rms(sim - fp), (rms(got - sim), rms(sim - fp))


def test_a_rule_integers_cannot_run_is_refused_before_any_work(tiny):
    acts_only = QuantPolicy(w_bits=4, a_bits=6, rules=({"pattern": "blocks_0/ffn/fc1", "weights": False},))
    with pytest.raises(ValueError, match="blocks_0/ffn/fc1: its inputs are quantized but its weights are not"):
        sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, acts_only, execution="int")
    registry.register_act_quantizer("clip_test", lambda x, bits, group, s: x, overwrite=True)
    custom = QuantPolicy(w_bits=8, a_bits=8, rules=({"pattern": "head", "act_quantizer": "clip_test"},))
    with pytest.raises(ValueError, match="head: activation quantizer 'clip_test' has no integer form"):
        sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, custom, execution="int")
    with pytest.raises(ValueError, match="needs a quantized model"):
        sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, None, execution="int")
    with pytest.raises(ValueError, match="execution must be one of"):
        sampling.Sampler(VAE_CFG, VAR_CFG, SC, jnp.float32, acts_only, execution="int8")
    with pytest.raises(ValueError, match="act_kernel must be one of"):
        execution.IntegerPolicy.of(QuantPolicy(w_bits=8, a_bits=8), act_kernel="triton")
    with pytest.raises(ValueError, match="attn_kernel must be one of"):
        execution.IntegerPolicy.of(QuantPolicy(w_bits=8, a_bits=8), attn_kernel="cudnn")
    with pytest.raises(ValueError, match="attn_kernel must be one of"):
        execution.IntegerPolicy.of(QuantPolicy(w_bits=8, a_bits=8), attn_kernel="auto")
    auto = execution.IntegerPolicy.of(QuantPolicy(w_bits=8, a_bits=8))
    assert auto.act_kernel == "auto"
    assert auto.act_codes_kernel() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    fixed = execution.IntegerPolicy.of(QuantPolicy(w_bits=8, a_bits=8), act_kernel="xla")
    assert fixed.act_codes_kernel() == "xla"


def test_checkpoints_load_as_integer_models(tmp_path, tiny, teacher_forced):
    """A checkpoint written before integer execution (format 1) and one written now load straight into the integer
    form (no float kernels); weight-only, the logits equal the simulation's."""
    old = export.load_quantized("tests/fixtures/v1_quantized_tiny", execution="int")
    assert isinstance(old.policy, execution.IntegerPolicy) and execution.is_integer(old.quant)
    old_labels = jnp.array([1])
    old_x = jnp.zeros((1, old.var_cfg.L - old.var_cfg.patch_nums[0] ** 2, old.var_cfg.cvae))
    old_logits = forward(old.var_cfg, old.policy, {"params": old.params["var"], "quant": old.quant}, old_labels, old_x)
    assert np.isfinite(np.asarray(old_logits)).all()
    policy = QuantPolicy(w_bits=4, a_bits=6, acts=False)
    quant = state.init_quant_state(tiny["var"], policy)
    ck = checkpoint.ModelCheckpoint(VAE_CFG, VAR_CFG, tiny, {})
    path = export.save_quantized(str(tmp_path / "q"), ck, tiny["var"], quant, policy)
    loaded = export.load_quantized(path, execution="int")
    assert "kernel" not in loaded.params["var"]["head"]
    sim_ck = export.load_quantized(path)
    labels, x, _ = teacher_forced
    sim = forward(VAR_CFG, sim_ck.policy.for_inference(), {"params": sim_ck.params["var"], "quant": sim_ck.quant},
                  labels, x)
    got = forward(VAR_CFG, loaded.policy, {"params": loaded.params["var"], "quant": loaded.quant}, labels, x)
    np.testing.assert_array_equal(got, sim)
    with pytest.raises(checkpoint.CheckpointError, match="full-precision checkpoint: integer execution"):
        export.load_any(checkpoint.save(str(tmp_path / "fp"), VAE_CFG, VAR_CFG, tiny), execution="int")


def test_a_sample_set_records_its_execution_and_refuses_the_other(tmp_path, tiny):
    from varq_jax.eval import generate
    policy = QuantPolicy(w_bits=4, a_bits=6)
    quant = state.init_quant_state(tiny["var"], policy)
    labels = np.arange(4, dtype=np.int32)
    plans = {}
    for name, pol in (("simulate", policy), ("int", execution.IntegerPolicy.of(policy))):
        model = checkpoint.ModelCheckpoint(VAE_CFG, VAR_CFG, tiny, {})
        model.policy, model.quant = pol, quant
        plans[name] = generate.make_plan(model, labels, 0, SC, jnp.float32, 2, None)
    assert plans["simulate"]["execution"] == "simulate" and plans["int"]["execution"] == "int"
    old = {k: v for k, v in plans["simulate"].items() if k != "execution"}       # written before the field
    (tmp_path / generate.MANIFEST).write_text(json.dumps(old))
    assert generate._check_or_write_manifest(str(tmp_path), plans["simulate"], {}) is not None
    with pytest.raises(ValueError, match="execution: 'simulate' there, 'int' now"):
        generate._check_or_write_manifest(str(tmp_path), plans["int"], {})
