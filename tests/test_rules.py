"""The rule table: resolution, validation, every consumer asking the same full path, round trips, BOPs per site,
mixed precision (LiteVAR) and pinned float32 precision."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ptq
from test_generate import random_like
from varq_jax import checkpoint, sampling
from varq_jax.models import zoo
from varq_jax.models.build import abstract_params
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import bops, export, pipeline, quantizers, recon_stage, state, units
from varq_jax.quant.policy import QuantPolicy
from varq_jax.quant.rules import Rule, resolve, shorthand_rules

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VAE_CFG, VAR_CFG = zoo.tiny((1, 2, 3), depth=5, width=128, vocab_size=32)
SC = sampling.SamplingConfig(1.5, 16, 0.9)


@pytest.fixture(scope="module")
def params():
    """Random weights drawn in NumPy (Flax's init runs eagerly for ~20 s on a CPU; no test here needs its values)."""
    return random_like(abstract_params(VAE_CFG, VAR_CFG))


# --- resolution and validation ---------------------------------------------------------------------------------------
def test_first_matching_rule_that_sets_a_field_wins():
    table = (Rule("blocks_3/*", w_bits=8), Rule("blocks_*/ffn/fc2", w_bits=6, a_bits=8), Rule.fp("head")) + \
        shorthand_rules(4, 6)
    fc2 = resolve(table, "blocks_3/ffn/fc2")
    assert (fc2.w_bits, fc2.a_bits, fc2.w_group) == (8, 8, "auto")
    assert dict(fc2.matched)["w_bits"] == "blocks_3/*" and dict(fc2.matched)["a_bits"] == "blocks_*/ffn/fc2"
    assert (resolve(table, "blocks_2/ffn/fc2").w_bits, resolve(table, "blocks_2/ffn/fc1").w_bits) == (6, 4)
    head = resolve(table, "head")
    assert not (head.weights or head.acts or head.attn) and head.w_bits == 4
    assert resolve(table, "blocks_3/attn").a_bits == 6       # patterns are fnmatch over the full path


def test_granularity_and_quantizer_choices():
    r = resolve(shorthand_rules(4, 4), "blocks_0/ffn/fc1")
    assert r.weight_group(256) == 128 and r.weight_group(200) is None           # the official rule
    assert r.act_spec("fc1", 256) == ("per_group", 64) and r.act_spec("fc2", 256) == ("signed_split", 64)
    c = resolve((Rule("*", w_group="channel", a_group="token"),) + shorthand_rules(4, 4), "x")
    assert c.weight_group(256) is None and c.act_spec("fc1", 256) == ("per_token", None)
    g = resolve((Rule("*", w_group=32, a_group=16, act_quantizer="signed_split"),) + shorthand_rules(4, 4), "x")
    assert g.weight_group(256) == 32 and g.act_spec("fc1", 256) == ("signed_split", 16)
    with pytest.raises(ValueError, match="w_group 32 does not divide"):
        g.weight_group(48)


def test_a_rule_that_matches_nothing_is_an_error_naming_it():
    QuantPolicy(rules=(Rule("shared_ada_lin", w_bits=8, optional=True),)).check(VAR_CFG)
    with pytest.raises(ValueError, match="'blocks_3/ffn/fc9'"):
        QuantPolicy(rules=(Rule("blocks_3/ffn/fc9", w_bits=8),)).check(VAR_CFG)
    with pytest.raises(ValueError, match="'nosuch'"):
        QuantPolicy(fp_modules=("nosuch",)).check(VAR_CFG)
    c = ptq.make(4, 6, "baseline")
    c.fp_modules = ("nosuch",)
    with pytest.raises(ValueError, match="'nosuch'"):
        pipeline.validate_config(c, VAR_CFG)


@pytest.mark.parametrize("kw, match", [(dict(w_bits=9), "rule 'head': w_bits"), (dict(w_group=0), "w_group"),
                                       (dict(rounding="stochastic"), "rounding"), (dict(acts=1), "acts"),
                                       (dict(act_quantizer="nosuch"), "'nosuch' is not registered")])
def test_bad_rules_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantPolicy(rules=(Rule("head", **kw),))


def test_config_rules_come_first_and_round_trip():
    c = ptq.make(4, 4, "full_litevar")
    c.rules = ({"pattern": "head", "w_bits": 8},)
    policy = pipeline.policy_from_config(c)
    assert [r.pattern for r in policy.table[:2]] == ["head", "blocks_*/ffn/fc2"]
    back = QuantPolicy.from_dict(policy.to_dict())
    assert back.table == policy.table
    with pytest.raises(ValueError, match="unknown rule fields"):
        Rule.from_dict({"pattern": "head", "bits": 8})


# --- every consumer sees full paths -----------------------------------------------------------------------------------
def test_units_and_partial_models_keep_rules_and_subclasses(params):
    @dataclasses.dataclass(frozen=True)
    class Mine(QuantPolicy):
        tag: str = "mine"

    pol = Mine(rules=(Rule("blocks_1/ffn/fc2", w_bits=8), Rule.fp("blocks_1/attn/proj")), tag="x")
    partial = units.partial_model_policy(pol)
    assert type(partial) is Mine and partial.tag == "x" and partial.table == pol.table and partial.phase == "hard"
    ffn = units.target_by_name(VAR_CFG, "blocks_1/ffn")
    unit = units.standalone_policy(pol, ffn, params["var"]["blocks_1"]["ffn"])
    assert (unit.rule_for("fc2").w_bits, unit.rule_for("fc1").w_bits) == (8, 4)
    other = units.standalone_policy(pol, units.target_by_name(VAR_CFG, "blocks_2/ffn"),
                                      params["var"]["blocks_2"]["ffn"])
    assert other.rule_for("fc2").w_bits == 4 and other != unit
    attn = units.target_by_name(VAR_CFG, "blocks_1/attn")
    assert units.trainable_linears(pol, attn, params["var"]["blocks_1"]["attn"]) == [("mat_qkv",)]


def test_state_codes_and_weights_follow_each_sites_rule(params):
    pol = QuantPolicy(w_bits=4, a_bits=6, rules=(Rule("head", w_bits=8), Rule.fp("blocks_0/ffn/fc1")),
                      phase="nearest")
    q = state.init_quant_state(params["var"], pol)
    assert "fc1" not in q["blocks_0"]["ffn"] and q["head"]["delta"].shape == (1, VAR_CFG.vocab_size)
    w_hat, _ = pol.for_inference().prepare_params(params["var"], q)
    head = params["var"]["head"]["kernel"]
    np.testing.assert_array_equal(np.asarray(w_hat["head"]["kernel"]),
                                  np.asarray(quantizers.quantize_weight(head, 8)))    # not clipped to 4 bits
    np.testing.assert_array_equal(np.asarray(w_hat["blocks_0"]["ffn"]["fc1"]["kernel"]),
                                  np.asarray(params["var"]["blocks_0"]["ffn"]["fc1"]["kernel"]))
    _, codes, sites = export.export_codes(params["var"], q, pol)
    assert sites["head"]["bits"] == 8 and "blocks_0/ffn/fc1" not in codes
    assert codes["head"].size == head.size and codes["blocks_0/ffn/fc2"].size == \
        params["var"]["blocks_0"]["ffn"]["fc2"]["kernel"].size // 2


def test_scanned_sampler_applies_a_block_3_rule(params, caplog):
    pol = QuantPolicy(w_bits=4, a_bits=6, acts=False, rules=(Rule("blocks_3/ffn/fc2", w_bits=8),))
    uniform = QuantPolicy(w_bits=4, a_bits=6, acts=False)
    runs = sampling.block_runs(VAR_CFG, pol)
    assert [(a, b) for a, b, _ in runs] == [(0, 3), (3, 4), (4, 5)]
    assert runs[1][2].rule_for("ffn/fc2").w_bits == 8 and runs[0][2] == runs[2][2]
    assert len(sampling.block_runs(VAR_CFG, uniform)) == 1

    def logits(policy, scan):
        q = state.set_theta(state.init_quant_state(params["var"], policy), 0.05)
        toks = [jnp.zeros((2, pn * pn), jnp.int32) + i for i, pn in enumerate(VAR_CFG.patch_nums)]
        with caplog.at_level("INFO", logger="varq_jax.sampling"):
            _, _, logged = sampling.generate(VQVAE(VAE_CFG), VAR(VAR_CFG, jnp.float32, policy.for_inference()), SC,
                                             params, q, jnp.array([1, 2]), jax.random.split(jax.random.PRNGKey(0), 2),
                                             toks, jnp.ones((2, 3, 3)), collect_logits=True, scan_blocks=scan)
        return np.concatenate([np.asarray(g).reshape(-1) for g, _ in logged])

    scanned = logits(pol, True)
    assert "scanning runs [0, 3), [3, 4), [4, 5)" in caplog.text
    np.testing.assert_allclose(scanned, logits(pol, False), atol=2e-5)
    assert not np.allclose(scanned, logits(uniform, True), atol=1e-4)


# --- BOPs per site -----------------------------------------------------------------------------------------------------
def test_bops_are_counted_per_site():
    cfg = VAR_CFG
    uniform = pipeline.policy_from_config(ptq.make(4, 4, "brecq"))
    lite = pipeline.policy_from_config(ptq.make(4, 4, "litevar"))
    lite8 = pipeline.policy_from_config(ptq.make(4, 4, "litevar_w8"))
    fc2 = [s for s in bops.site_bops(cfg, uniform) if s.path.endswith("ffn/fc2")]
    assert len(fc2) == cfg.depth and all((s.w_bits, s.a_bits) == (4, 4) for s in fc2)
    macs = sum(s.macs for s in fc2)
    assert bops.total_bops(cfg, lite) == bops.total_bops(cfg, uniform) + macs * (16 * 16 - 4 * 4)
    assert bops.total_bops(cfg, lite8) == bops.total_bops(cfg, uniform) + macs * (8 * 8 - 4 * 4)
    assert sum(s.macs for s in bops.site_bops(cfg, uniform)) == bops.total_macs(cfg)
    rows = {r["site"]: r for r in pipeline.site_table(cfg, lite)}
    assert rows["blocks_0/ffn/fc2"]["weights"] == "FP" and rows["blocks_0/ffn/fc2"]["rules"][0] == "blocks_*/ffn/fc2"
    assert rows["blocks_0/attn"]["acts"] == "A4 plain"


# --- mixed precision presets, end to end at a tiny budget ------------------------------------------------------------
@pytest.mark.parametrize("method", ["litevar", "full_litevar_w8"])
def test_litevar_methods(params, method, tmp_path):
    c = ptq.make(4, 4, method)
    c.calib.num_samples, c.calib.batch_size, c.theta.n_grids, c.dtype = 2, 2, 100, "float32"
    c.recon.iters, c.recon.units, c.samples.num = 2, ("blocks_0/ffn", "blocks_1/ffn"), 0
    ck = checkpoint.ModelCheckpoint(VAE_CFG, VAR_CFG, params, {})
    result = pipeline.ptq(ck, *pipeline.from_config(c, ck.var_cfg), log=lambda *_: None,
                          reconstruct=recon_stage.reconstruct)
    fc2 = result.quant["blocks_0"]["ffn"].get("fc2", {})
    if method == "litevar":
        assert not fc2 and "alpha" in result.quant["blocks_0"]["ffn"]["fc1"]
        assert result.report["bops"]["quantized"] == bops.total_bops(VAR_CFG, result.policy)
    else:
        kernel = params["var"]["blocks_0"]["ffn"]["fc2"]["kernel"]
        np.testing.assert_array_equal(np.asarray(fc2["delta"]),
                                      np.asarray(quantizers.weight_minmax_params(kernel, 8, None)[0]))
        assert "alpha" in fc2 and "theta" in result.report
    path = str(tmp_path / "model")
    export.save_quantized(path, ck, params["var"], result.quant, result.policy)
    loaded = export.load_quantized(path)
    assert loaded.policy.table == result.policy.table
    assert ("blocks_0/ffn/fc2" in checkpoint.read_metadata(path)["quantized"]["sites"]) == (method != "litevar")


# --- checkpoints written before the rule table ------------------------------------------------------------------------
def test_a_version_1_quantized_checkpoint_still_loads_and_samples_the_same():
    path = os.path.join(FIXTURES, "v1_quantized_tiny")
    want = np.load(os.path.join(FIXTURES, "v1_quantized_tiny_expected.npz"))
    with pytest.raises(checkpoint.CheckpointError, match="load_quantized"):
        checkpoint.load(path)
    ck = export.load_quantized(path)
    assert (ck.policy.w_bits, ck.policy.a_bits, ck.policy.fp_modules) == (4, 6, ("head",))
    images, tokens = sampling.Sampler(ck.vae_cfg, ck.var_cfg, SC, jnp.float32, ck.policy)(
        ck.params, np.array([0, 1]), jax.random.PRNGKey(0), quant=ck.quant)
    for i, t in enumerate(tokens):
        np.testing.assert_array_equal(np.asarray(t), want[f"tokens_{i}"])
    np.testing.assert_allclose(np.asarray(images), want["images"], atol=1e-5)


# --- float32 means float32 ----------------------------------------------------------------------------------------------
def test_float32_programs_are_lowered_at_highest_precision(params):
    settings = pipeline.PTQSettings(dtype="float32")
    target = units.target_by_name(VAR_CFG, "blocks_0/ffn")
    mp = params["var"]["blocks_0"]["ffn"]
    pol = QuantPolicy(w_bits=4, a_bits=6)
    mq = state.init_quant_state({"ffn": mp}, pol)["ffn"]
    from varq_jax.quant import reconstruction as rec
    rc = rec.ReconConfig(iters=2)
    alpha = rec.init_module_alpha(mp, mq, units.trainable_linears(pol, target, mp))
    soft = units.standalone_policy(pol, target, mp, phase="soft")
    x = jnp.ones((2, 2, VAR_CFG.L, VAR_CFG.width))

    def lowered():
        return rec.optimize_alpha.lower(target.spec, VAR_CFG, soft, rc, VAR_CFG.begin_ends, mp, mq, alpha, x, x,
                                        jax.random.PRNGKey(0)).as_text()
    with pipeline.precision_scope(settings, jnp.float32):
        pinned = lowered()
    assert pinned.count("dot_general") > 0
    assert pinned.count("precision = [HIGHEST, HIGHEST]") == pinned.count("dot_general")
    assert "HIGHEST" not in lowered()
    with pipeline.precision_scope(dataclasses.replace(settings, matmul_precision="default"), jnp.float32):
        assert "HIGHEST" not in lowered()
    with pipeline.precision_scope(settings, jnp.bfloat16):      # 16-bit programs stay as they are
        assert "HIGHEST" not in lowered()


def test_the_pipeline_pins_precision_in_its_float32_stages(params, monkeypatch, tmp_path):
    seen = {}
    real_stats = pipeline.theta_lib.attention_statistics

    def spy(name, fn):
        def wrapped(*a, **k):
            seen[name] = jax.config.jax_default_matmul_precision
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(pipeline.calibration, "generate_calibration",
                        spy("calibration", pipeline.calibration.generate_calibration))
    monkeypatch.setattr(pipeline.theta_lib, "attention_statistics", spy("theta", real_stats))
    recon = spy("reconstruction", lambda ck, policy, quant, *a: (quant, {}))
    c = ptq.make(4, 6, "brecq_sas")
    c.calib.num_samples, c.calib.batch_size, c.theta.n_grids, c.dtype, c.samples.num = 2, 2, 100, "float32", 0
    ck = checkpoint.ModelCheckpoint(VAE_CFG, VAR_CFG, params, {})
    pipeline.ptq(ck, *pipeline.from_config(c, ck.var_cfg), log=lambda *_: None, reconstruct=recon)
    assert seen == {"calibration": "highest", "theta": "highest", "reconstruction": "highest"}
