"""docs/extending.md, step by step: a registered activation quantizer with calibrated state and a per-module rule
(an 8-bit head in a W4A6 model) through PTQ, sampling, saving and loading."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax import checkpoint, default_model, sampling
from varq_jax.quant import (CalibSettings, PTQSettings, QuantPolicy, ReconConfig, Rule, ThetaSettings, load_quantized,
                            quantize, quantizers, register_act_quantizer, registry, save_quantized, state)
from varq_jax.quant.units import standalone_policy, target_by_name


def static_minmax(x, bits, group_size, state):
    n = 2 ** bits
    delta = jnp.maximum((state["hi"] - state["lo"]) / (n - 1), quantizers.EPS)
    zero_point = jnp.round(-state["lo"] / delta)
    q = quantizers.clip_ste(quantizers.round_ste(x / delta) + zero_point, 0, n - 1)
    return (q - zero_point) * delta


register_act_quantizer(
    "static_minmax", static_minmax,
    init_state=lambda in_features, bits, group_size: {"lo": jnp.float32(jnp.inf), "hi": jnp.float32(-jnp.inf)},
    observe=lambda x, s: {"lo": jnp.minimum(s["lo"], x.min()), "hi": jnp.maximum(s["hi"], x.max())},
    overwrite=True)

POLICY = QuantPolicy(w_bits=4, a_bits=6, rules=(
    Rule("head", w_bits=8, a_bits=8),
    Rule("blocks_*/ffn/fc1", act_quantizer="static_minmax"),
))
SETTINGS = PTQSettings(calib=CalibSettings(num_samples=4, batch_size=4), theta=ThetaSettings(n_grids=1000),
                       recon=ReconConfig(iters=20, units=("blocks_0/ffn", "head")), resampling=False,
                       dtype="float32")
SC = sampling.SamplingConfig(1.5, 64, 0.9)
LABELS = [0, 1, 2]


@pytest.fixture(scope="module")
def run():
    model = default_model.load_model()
    POLICY.check(model.var_cfg)
    return model, quantize(model, POLICY, SETTINGS, log=lambda *_: None)


def test_rules_resolve_per_site():
    assert (POLICY.rule_for("head").w_bits, POLICY.rule_for("head").a_bits) == (8, 8)
    assert POLICY.rule_for("head_nm").w_bits == 4
    assert POLICY.rule_for("blocks_3/ffn/fc1").act_quantizer == "static_minmax"
    assert POLICY.rule_for("blocks_3/ffn/fc2").act_spec("fc2", 1024) == ("signed_split", None)


def test_the_head_is_reconstructed_at_8_bits(run):
    model, result = run
    kernel = model.params["var"]["head"]["kernel"]
    q = result.quant["head"]
    want_delta, want_zp = quantizers.weight_minmax_params(kernel, 8, None)
    np.testing.assert_array_equal(np.asarray(q["delta"]), np.asarray(want_delta))
    np.testing.assert_array_equal(np.asarray(q["zero_point"]), np.asarray(want_zp))
    assert "alpha" in q                                   # the unit was reconstructed ...
    unit = standalone_policy(result.policy, target_by_name(model.var_cfg, "head"), model.params["var"]["head"])
    assert unit.rule_for("").w_bits == 8                  # ... as an 8-bit layer (its full path 'head')
    codes = state.integer_codes(kernel, q, 8)
    assert int(codes.max()) > 15                          # 8-bit codes, not clipped to 4 bits
    rows = {r["site"]: r for r in result.report["sites"]}
    assert rows["head"]["weights"].startswith("W8 ") and rows["head"]["rules"][0] == "head"
    assert rows["head_nm"]["weights"].startswith("W4 group-128")


def test_the_quantizer_state_is_calibrated(run):
    _, result = run
    for i in range(6):
        act = result.quant[f"blocks_{i}"]["ffn"]["fc1"]["act"]
        assert np.isfinite(float(act["lo"])) and float(act["lo"]) < float(act["hi"])
    assert "act" not in result.quant["blocks_0"]["ffn"]["fc2"]


def test_sampling_keeps_the_head_at_8_bits_and_save_load_round_trips(run, tmp_path):
    model, result = run
    w_hat, _ = result.policy.for_inference().prepare_params(model.params["var"], result.quant)
    q = result.quant["head"]
    kernel = model.params["var"]["head"]["kernel"]
    eight_bit = quantizers.adaround_weight(kernel, q["alpha"], q["delta"], q["zero_point"], 8)
    np.testing.assert_array_equal(np.asarray(w_hat["head"]["kernel"]), np.asarray(eight_bit))

    sampler = sampling.Sampler(model.vae_cfg, model.var_cfg, SC, jnp.float32, result.policy)
    images, _ = sampler(model.params, LABELS, jax.random.PRNGKey(0), quant=result.quant)

    path = str(tmp_path / "model")
    save_quantized(path, model, result.var_params, result.quant, result.policy)
    ck = load_quantized(path)
    assert ck.policy.table == result.policy.table
    assert checkpoint.read_metadata(path)["quantized"]["sites"]["head"]["bits"] == 8
    np.testing.assert_array_equal(np.asarray(ck.quant["blocks_2"]["ffn"]["fc1"]["act"]["hi"]),
                                  np.asarray(result.quant["blocks_2"]["ffn"]["fc1"]["act"]["hi"]))
    # The loaded kernels are the codes' ŵ (the learned rounding baked in): re-quantizing them is exact, so the
    # same compiled sampler gives the same images from the checkpoint.
    disk, _ = sampler(ck.params, LABELS, jax.random.PRNGKey(0), quant=ck.quant)
    np.testing.assert_array_equal(np.asarray(images), np.asarray(disk))

    saved = registry.ACT_QUANTIZERS.pop("static_minmax")
    try:
        with pytest.raises(checkpoint.CheckpointError, match="'static_minmax' is not registered"):
            load_quantized(path)
    finally:
        registry.ACT_QUANTIZERS["static_minmax"] = saved
