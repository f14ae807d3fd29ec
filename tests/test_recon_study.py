"""The reconstruction study: its two measurements on a tiny model (flips against a known count, the KL of a model
to itself), the whole study on a tiny saved model (slow: two PTQ runs), and bad input refused before any work."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_generate import small_model
from varq_jax import checkpoint, cli
from varq_jax.quant.export import load_quantized
from varq_jax.runs import recon_study

OVERRIDES = {"calib": {"num_samples": 4, "batch_size": 4}, "recon": {"iters": 4}, "samples": {"num": 0},
             "theta": {"n_grids": 1000}}


def _config():
    c = cli.load_config(cli.resolve_config("w4a6:brecq"))
    for section, fields in OVERRIDES.items():
        for k, v in fields.items():
            c[section][k] = v
    c.dtype = "float32"
    return c


def test_rounding_flips_count_the_codes_that_differ_from_nearest():
    import jax
    from varq_jax.checkpoint import ModelCheckpoint
    from varq_jax.quant import diagnostics, state
    from varq_jax.quant.policy import QuantPolicy
    m = small_model()
    policy = QuantPolicy(w_bits=4, a_bits=6)
    quant = state.init_quant_state(m.params["var"], policy)
    kernel, node = m.params["var"]["head"]["kernel"], quant["head"]
    codes = np.asarray(state.integer_codes(kernel, node, 4, learned=False)).copy()
    flat = codes.reshape(-1)
    moved = np.arange(0, flat.size, 7)
    flat[moved] = np.where(flat[moved] < 15, flat[moved] + 1, flat[moved] - 1)    # one step, inside the grid
    var = jax.tree.map(lambda a: a, m.params["var"])
    var["head"] = dict(var["head"], kernel=state.dequantize(jnp.asarray(codes), node))
    q = ModelCheckpoint(m.vae_cfg, m.var_cfg, {"vae": m.params["vae"], "var": var}, {}, policy=policy, quant=quant)
    flips = diagnostics.rounding_flips(m.params["var"], q, prefix="head")
    assert set(flips) == {"head"} and flips["head"] == pytest.approx(len(moved) / flat.size)
    assert diagnostics.rounding_flips(m.params["var"], q, prefix="head_nm") == {"head_nm": 0.0}


def test_teacher_forced_kl_is_zero_for_the_model_itself_and_grows_with_quantization():
    from varq_jax.checkpoint import ModelCheckpoint
    from varq_jax.quant import diagnostics, state
    from varq_jax.quant.policy import QuantPolicy
    m = small_model()
    rng = np.random.default_rng(0)
    labels = np.arange(4) % m.var_cfg.num_classes
    tokens = [rng.integers(0, m.vae_cfg.vocab_size, (4, pn * pn)) for pn in m.var_cfg.patch_nums]
    kl = {}
    for name, policy in (("off", QuantPolicy(weights=False, acts=False, attn=False)),
                         ("w4a6", QuantPolicy(w_bits=4, a_bits=6))):
        q = ModelCheckpoint(m.vae_cfg, m.var_cfg, m.params, {}, policy=policy,
                            quant=state.init_quant_state(m.params["var"], policy))
        kl[name] = diagnostics.teacher_forced_kl(m, q, labels, tokens, batch_size=2)
    assert abs(kl["off"]) < 1e-6 and kl["w4a6"] > 1e-4


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon_study")
    m = small_model()
    checkpoint.save(str(root / "model"), m.vae_cfg, m.var_cfg, m.params, meta=m.meta)
    s = recon_study.Study(units=("head",), points=((1e-4, 1e-5), (3e-2, 0.0)), heldout_samples=2)
    result = recon_study.run_study(_config(), s, str(root / "wd"), str(root / "study.md"),
                                   checkpoint=str(root / "model"), log=lambda x: None)
    return root, m, result


@pytest.mark.slow      # two PTQ runs (~40 s); the flip count and the KL have the fast tests above
def test_the_study_reports_each_points_flips_errors_and_kl(study):
    root, m, result = study
    rows = {(r["point"], r["unit"]): r for r in result["rows"]}
    assert set(rows) == {(0, "head"), (1, "head")}
    for point in (0, 1):
        q = load_quantized(str(root / "wd" / f"point_{point}" / "model"))
        node = q.quant["head"]
        delta, zp = np.asarray(node["delta"], np.float64), np.asarray(node["zero_point"], np.float64)
        top = 2 ** q.policy.rule_for("head").w_bits - 1
        w = np.asarray(m.params["var"]["head"]["kernel"], np.float64)
        w_hat = np.asarray(traverse_util.flatten_dict(q.params["var"])[("head", "kernel")], np.float64)
        if delta.ndim == 3:                                            # per group along the input: [G, K/G, N]
            w, w_hat = (a.reshape(delta.shape[0], -1, a.shape[1]) for a in (w, w_hat))
        nearest = np.clip(np.round(w / delta) + zp, 0, top)
        learned = np.round(w_hat / delta) + zp
        assert rows[(point, "head")]["flipped"] == pytest.approx(np.mean(nearest != learned))
    assert rows[(1, "head")]["flipped"] > rows[(0, "head")]["flipped"]       # a 300× larger step rounds more
    for r in result["rows"]:
        assert r["model_kl"] >= 0 and r["error_nearest"] > 0 and r["error_hard"] > 0
    assert result["nearest_model_kl"] >= 0
    md = (root / "study.md").read_text()
    assert md.count("| head |") == 2 and json.load(open(root / "study.json"))["rows"] == result["rows"]


def test_bad_study_input_is_refused_before_any_work(tmp_path):
    m = small_model()
    checkpoint.save(str(tmp_path / "model"), m.vae_cfg, m.var_cfg, m.params, meta=m.meta)
    with pytest.raises(ValueError, match="no reconstruction unit 'blocks_9/ffn'"):
        recon_study.run_study(_config(), recon_study.Study(units=("blocks_9/ffn",)), str(tmp_path / "wd"),
                              str(tmp_path / "s.md"), checkpoint=str(tmp_path / "model"))
    baseline = cli.load_config(cli.resolve_config("w4a6:baseline"))
    with pytest.raises(ValueError, match="AdaRound reconstruction"):
        recon_study.run_study(baseline, recon_study.Study(units=("head",)), str(tmp_path / "wd"),
                              str(tmp_path / "s.md"))
    with pytest.raises(ValueError, match="LR:LAMBDA"):
        recon_study.parse_points(["1e-4"])
    assert not (tmp_path / "wd").exists() and not (tmp_path / "s.md").exists()
