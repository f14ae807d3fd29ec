"""Today's presets as rule sets give the same quantized models as the code before the rule table.

`tests/fixtures/preset_digests_*.json` were recorded by `benchmarks/preset_digests/record.py` on the code before the
rule table (commit c96d680): SHA-256 of every array of each preset × method's quant state on the embedded default
model at a tiny budget (exact for integer codes, Δ, zero points and θ; α by digest, else within a tolerance of
its sums) and the per-site settings that code derived. A few of the roundings AdaRound learns sit on the threshold,
where float reductions that differ between CPUs flip them: a learned unit's codes that miss their digest must then
equal the recording (its nearest codes plus the bytes learning moved, `record_learned.py`) but for a few bytes.
The CI variant (five presets × {baseline, full}) reconstructs three units; the slow test runs all 25 combinations
with every unit (its recording has digests only).
"""
import hashlib
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from configs import ptq
from varq_jax import default_model
from varq_jax.quant import export, pipeline, recon_stage, rules
from varq_jax.quant.units import linear_paths, replace_subtree, subtree
from varq_jax.quant.reconstruction import ReconConfig, reconstruct_model, rounding_alpha, with_alpha

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CI_UNITS = ("blocks_0/attn", "blocks_0/ffn", "head")


def _config(combo: str, budget: dict):
    preset, method = combo.split(":")
    w, a = int(preset[1]), int(preset[3])
    c = ptq.make(w, a, method)
    for k, v in budget.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                setattr(getattr(c, k), kk, vv)
        else:
            setattr(c, k, v)
    return c


def _ci_reconstruct(ck, policy, quant, calib, settings, workdir, log):
    """As the recording's CI variant: CI_UNITS only; every other Linear gets the α of round-to-nearest."""
    rc = ReconConfig(iters=settings.recon.iters, measure_errors=False)
    r = reconstruct_model(ck.vae_cfg, ck.var_cfg, ck.params, quant, calib.labels, calib.tokens, policy, rc,
                          key=recon_stage.recon_key(settings), units=CI_UNITS)
    quant = r.quant
    for path in linear_paths(ck.params["var"]):
        if "alpha" not in subtree(quant, path):
            quant = _nearest(ck, quant, path)
    return quant, {}


def _nearest(ck, quant, path: tuple):
    """quant with the Linear at `path` given the α under which learned rounding is round-to-nearest."""
    node = subtree(quant, path)
    alpha = rounding_alpha({"kernel": subtree(ck.params["var"], path)["kernel"]}, node, [()], "nearest")
    return replace_subtree(quant, path, with_alpha(node, alpha))


def _sha(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def _site_settings(policy, var_cfg) -> dict:
    """The resolved per-site settings in the recording's terms."""
    out = {}
    for s in rules.model_sites(var_cfg):
        r = policy.rule_for(s.path)
        if s.kind == rules.LINEAR:
            act, group = r.act_spec(s.name, s.in_features)
            out[s.path] = {"kind": "linear", "weights": r.weights, "w_bits": r.w_bits,
                           "w_group": r.weight_group(s.in_features),
                           "rounding": r.rounding if policy.phase != "nearest" else "nearest",
                           "acts": r.acts, "a_bits": r.a_bits, "act_quantizer": act, "a_group": group}
        else:
            out[s.path] = {"kind": "attention", "attn": r.attn, "a_bits": r.a_bits, "shift_and_sum": r.shift_and_sum}
    return out


def _check(ck, recorded: dict, budget: dict, combo: str, ci: bool):
    config = _config(combo, budget)
    recon = (_ci_reconstruct if ci else recon_stage.reconstruct) if config.reconstruction else None
    result = pipeline.ptq(ck, *pipeline.from_config(config, ck.var_cfg), log=lambda *_: None, reconstruct=recon)
    want = recorded[combo]
    assert _site_settings(result.policy, ck.var_cfg) == want["sites"], combo
    assert result.report.get("theta") == want["theta"], combo
    _, codes, _ = export.export_codes(ck.params["var"], result.quant, result.policy)
    got = {"/".join(p): a for p, a in traverse_util.flatten_dict(result.quant).items()}
    got.update({f"codes:{k}": v for k, v in codes.items()})
    assert set(got) == set(want["state"]), (combo, sorted(set(got) ^ set(want["state"]))[:5])
    learned = {f"codes:{k}": v for k, v in want.get("learned_codes", {}).items()}
    for key, rec in want["state"].items():
        a = np.asarray(got[key])
        assert list(a.shape) == rec["shape"], (combo, key)
        if _sha(a) == rec["sha256"] or (key in learned and _sha(a) == learned[key]["sha256"]):
            continue
        if key.endswith("/alpha"):     # α after the same steps, up to the reductions' float rounding
            a64 = a.astype(np.float64)
            assert a64.sum() == pytest.approx(rec["sum"], rel=1e-4, abs=1e-3), (combo, key)
            assert np.abs(a64).sum() == pytest.approx(rec["abs_sum"], rel=1e-4), (combo, key)
        elif key in learned:
            _assert_near_recording(ck, result, key.split(":", 1)[1], a, learned[key], combo)
        else:
            raise AssertionError(f"{combo} {key}: digest differs from the recording")


def _assert_near_recording(ck, result, path: str, codes, rec: dict, combo: str):
    """A learned unit's codes against the recording: the same nearest codes, and all but ≤ 10 % of the bytes that
    learning moved (a real change of the method moves most of them; threshold flips a handful)."""
    quant = _nearest(ck, result.quant, tuple(path.split("/")))
    _, nearest, _ = export.export_codes(ck.params["var"], quant, result.policy)
    nearest = np.asarray(nearest[path])
    assert _sha(nearest) == rec["nearest_sha256"], (combo, path, "nearest codes")
    recorded = nearest.copy()
    recorded[np.asarray(rec["positions"], np.int64)] = np.asarray(rec["values"], nearest.dtype)
    differ = int(np.sum(recorded != codes))
    assert differ <= max(1, len(rec["positions"]) // 10), (combo, path, differ, len(rec["positions"]))


@pytest.fixture(scope="module")
def default():
    return default_model.load_model(None)


# Every preset's baseline and the full method of the main preset (each full run compiles its own θ-statistics
# sampler); the slow test below covers all 25 combinations at the real reconstruction.
CI_COMBOS = ("w8a8:baseline", "w6a6:baseline", "w4a8:baseline", "w4a6:baseline", "w4a4:baseline", "w4a6:full")


def test_presets_baseline_and_full_give_todays_models(default):
    recorded = json.load(open(os.path.join(FIXTURES, "preset_digests_ci.json")))
    assert set(CI_COMBOS) <= set(recorded)
    for combo in CI_COMBOS:
        _check(default, recorded, recorded["budget"], combo, ci=True)


@pytest.mark.slow
def test_all_25_presets_give_todays_models(default):
    recorded = json.load(open(os.path.join(FIXTURES, "preset_digests_all.json")))
    for combo in [k for k in recorded if ":" in k]:
        _check(default, recorded, recorded["budget"], combo, ci=False)
