"""Digests of every preset × method's quantized state on the embedded default model at a tiny budget.

Run once on the code before the rule table (commit c96d680) to record what today's presets produce; the test
`tests/test_preset_digests.py` rebuilds them with the current code and compares. Usage:
  python benchmarks/preset_digests/record.py OUT.json [--ci] [preset:method ...]
(--ci: the five presets × {baseline, full} with reconstruction of CI_UNITS only; default: all 25, all units.)
"""
import hashlib
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import traverse_util

PRESETS = ("w8a8", "w6a6", "w4a8", "w4a6", "w4a4")
METHODS = ("baseline", "brecq", "brecq_sas", "brecq_resample", "full")
TINY = dict(calib=dict(num_samples=2, batch_size=2), theta=dict(n_grids=100), recon=dict(iters=2),
            samples=dict(num=0), dtype="float32")


def tiny_config(preset: str, method: str):
    import importlib
    c = importlib.import_module(f"configs.{preset}").get_config(method)
    for k, v in TINY.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                setattr(getattr(c, k), kk, vv)
        else:
            setattr(c, k, v)
    return c


def sha(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def digest_state(quant: dict, codes: dict) -> dict:
    out = {}
    for path, leaf in sorted(traverse_util.flatten_dict(quant).items()):
        a = np.asarray(leaf)
        key = "/".join(path)
        if path[-1] == "alpha":
            out[key] = {"sha256": sha(a), "sum": float(a.astype(np.float64).sum()),
                        "abs_sum": float(np.abs(a.astype(np.float64)).sum()), "shape": list(a.shape)}
        else:
            out[key] = {"sha256": sha(a), "shape": list(a.shape)}
    for k, c in sorted(codes.items()):
        out[f"codes:{k}"] = {"sha256": sha(c), "shape": list(np.shape(c))}
    return out


def old_site_settings(policy, var_params, reconstruction: bool) -> dict:
    """Per-site settings as the code before the rule table derived them (global bits, fc2 signed split)."""
    import fnmatch
    from varq_jax.quant import quantizers, state
    sites = {}
    fp = lambda p: any(fnmatch.fnmatchcase(p, pat) for pat in policy.fp_modules)
    for path, shape in state.linear_kernel_shapes(var_params).items():
        on = not fp(path)
        site = path.split("/")[-1]
        wg = quantizers.weight_group_size(policy.w_bits, shape[0])
        ag = quantizers.act_group_size(policy.a_bits, shape[0])
        act = "signed_split" if site == "fc2" else ("per_group" if ag else "per_token")
        sites[path] = {"kind": "linear", "weights": on and policy.weights, "w_bits": policy.w_bits,
                       "w_group": wg, "rounding": "adaround" if reconstruction else "nearest",
                       "acts": on and policy.acts, "a_bits": policy.a_bits, "act_quantizer": act, "a_group": ag}
    for path in sorted({p.rsplit("/", 1)[0] for p in sites if p.endswith("/mat_qkv")}):
        on = policy.attn and not fp(path)
        sites[path] = {"kind": "attention", "attn": on, "a_bits": policy.a_bits,
                       "shift_and_sum": policy.shift_and_sum}
    return sites


def tree_paths():
    """(linear_paths, replace_subtree, subtree) of the code this runs on: quant/capture.py on c96d680."""
    try:
        from varq_jax.quant.capture import linear_paths, replace_subtree, subtree
    except ImportError:
        from varq_jax.quant.units import linear_paths, replace_subtree, subtree
    return linear_paths, replace_subtree, subtree


CI_UNITS = ("blocks_0/attn", "blocks_0/ffn", "head")     # the CI variant reconstructs these units only


def ci_reconstruct(ck, policy, quant, calib, config, workdir, log):
    """The CI variant's reconstruction stage: CI_UNITS, no error measurement, the pipeline's key; every other
    Linear gets the α under which learned rounding is round-to-nearest (so the hard-rounding θ stage runs)."""
    linear_paths, _, subtree = tree_paths()
    from varq_jax.quant.reconstruction import ReconConfig, reconstruct_model
    rc = ReconConfig(iters=config.recon.iters, measure_errors=False)
    r = reconstruct_model(ck.vae_cfg, ck.var_cfg, ck.params, quant, calib.labels, calib.tokens, policy, rc,
                          key=jax.random.PRNGKey(config.calib.seed + 20_000), units=CI_UNITS)
    quant = r.quant
    for path in linear_paths(ck.params["var"]):
        if "alpha" not in subtree(quant, path):
            quant = nearest_alpha(ck, quant, path)
    return quant, {}


def nearest_alpha(ck, quant, path: tuple):
    """quant with the Linear at `path` given the α under which learned rounding is round-to-nearest."""
    from varq_jax.quant.reconstruction import rounding_alpha, with_alpha
    _, replace_subtree, subtree = tree_paths()
    node = subtree(quant, path)
    alpha = rounding_alpha({"kernel": subtree(ck.params["var"], path)["kernel"]}, node, [()], "nearest")
    return replace_subtree(quant, path, with_alpha(node, alpha))


def run_old(preset: str, method: str, ci: bool = False) -> dict:
    from varq_jax import default_model
    from varq_jax.quant import pipeline, state
    from varq_jax.quant.recon_stage import reconstruct
    ck = default_model.load_model(None)
    config = tiny_config(preset, method)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd:      # c96d680's entry point
        result = pipeline.run_ptq(ck, config, wd, log=lambda *_: None,
                                  reconstruct=(ci_reconstruct if ci else reconstruct) if config.reconstruction
                                  else None)
    _, codes = state.export_quantized(ck.params["var"], result.quant, result.policy)
    return {"state": digest_state(result.quant, codes), "theta": result.report.get("theta"),
            "sites": old_site_settings(result.policy, ck.params["var"], bool(config.reconstruction)),
            "seconds": round(time.perf_counter() - t, 1)}


if __name__ == "__main__":
    ci = "--ci" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--ci"]
    out = args[0]
    combos = args[1:] or ([f"{p}:{m}" for p in PRESETS for m in ("baseline", "full")] if ci else
                          [f"{p}:{m}" for p in PRESETS for m in METHODS])
    results = json.load(open(out)) if os.path.exists(out) else {}
    for combo in combos:
        preset, method = combo.split(":")
        results[combo] = run_old(preset, method, ci)
        print(combo, results[combo]["seconds"], "s", flush=True)
        with open(out, "w") as f:
            json.dump({"budget": TINY, "jax": jax.__version__, **{k: v for k, v in results.items()
                                                                    if k not in ("budget", "jax")}}, f, indent=1)
