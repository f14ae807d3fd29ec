"""The Shift-and-Sum PTQ pipeline: calibration → weight-quantizer init → θ → resampling → reconstruction → θ.

`run_ptq(ck, config, workdir)` is what `python -m experiments.quantize` runs. Each finished stage leaves its
result in `workdir` (written atomically), so a stopped run resumes where it stopped; reconstruction resumes
from its last finished module. Stage wall times, θ, BOPs and per-layer quantization errors go into the report.
"""
import dataclasses
import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from varq_jax import sampling
from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import bops, calibration, resampling, state, theta as theta_lib
from varq_jax.quant.policy import QuantPolicy

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def policy_from_config(config) -> QuantPolicy:
    return QuantPolicy(w_bits=config.w_bits, a_bits=config.a_bits, weights=config.quantize_weights,
                       acts=config.quantize_acts, attn=config.quantize_attn, shift_and_sum=config.shift_and_sum,
                       rounding="hard" if config.rounding == "adaround" and config.reconstruction else "nearest",
                       fp_modules=tuple(config.fp_modules))


def validate_config(config, var_cfg) -> None:
    """Every check that can fail, before any work (bits, θ grid, sizes, names)."""
    if config.rounding not in ("nearest", "adaround"):
        raise ValueError(f"rounding must be 'nearest' or 'adaround', got {config.rounding!r}")
    if config.reconstruction and config.rounding != "adaround":
        raise ValueError("reconstruction learns AdaRound rounding: set rounding='adaround'")
    policy_from_config(config)                             # bit widths
    if not config.theta.n_grids > 0:
        raise ValueError(f"theta.n_grids must be positive, got {config.theta.n_grids}")
    if not 0 < config.theta.alpha:
        raise ValueError(f"theta.alpha (BOP budget fraction) must be positive, got {config.theta.alpha}")
    if config.samples.num < 0:
        raise ValueError(f"samples.num (comparison grid size, 0 = none) must be >= 0, got {config.samples.num}")
    if config.calib.num_samples <= 0 or config.calib.batch_size <= 0:
        raise ValueError("calib.num_samples and calib.batch_size must be positive")
    if not 1 <= config.theta.num_samples <= config.calib.num_samples:
        raise ValueError("theta.num_samples must be in [1, calib.num_samples]")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    sampling.validate(calib_settings(config, var_cfg), var_cfg, np.zeros(1, np.int32))


def calib_settings(config, var_cfg) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(config.calib.cfg, min(config.calib.top_k, var_cfg.vocab_size), config.calib.top_p)


class Workdir:
    """Stage results on disk: small JSON records and npz arrays, each written atomically."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.record_file = os.path.join(path, "stages.json")
        self.records = json.load(open(self.record_file)) if os.path.exists(self.record_file) else {}

    def done(self, stage: str) -> bool:
        return stage in self.records

    def finish(self, stage: str, **record) -> None:
        self.records[stage] = record
        tmp = self.record_file + ".partial"
        with open(tmp, "w") as f:
            json.dump(self.records, f, indent=1)
        os.replace(tmp, self.record_file)

    def save_arrays(self, name: str, **arrays) -> None:
        path = os.path.join(self.path, name + ".npz")
        with open(path + ".partial", "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(path + ".partial", path)

    def load_arrays(self, name: str) -> dict:
        with np.load(os.path.join(self.path, name + ".npz")) as z:
            return {k: z[k] for k in z.files}


@dataclasses.dataclass
class PTQResult:
    policy: QuantPolicy
    var_params: dict            # the FP parameters (kernels are quantized through `quant`)
    quant: dict                 # the 'quant' collection: scales, zero points, AdaRound α, θ
    report: dict
    calib: calibration.CalibrationSet


def _timed(report: dict, stage: str, log: Callable):
    class _T:
        def __enter__(self):
            log(f"[{stage}] ...")
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            if exc[0] is None:
                report["stages"][stage] = round(time.perf_counter() - self.t, 3)
                log(f"[{stage}] done in {report['stages'][stage]:.1f} s")
    return _T()


def run_ptq(ck: ModelCheckpoint, config, workdir: str, log: Callable = print,
            reconstruct: Optional[Callable] = None) -> PTQResult:
    """The whole pipeline on a loaded FP model. `reconstruct(ck, policy, quant, calib, config, workdir, log)`
    returns the quant tree with learned α (the BRECQ/AdaRound stage); None skips reconstruction."""
    var_cfg = ck.var_cfg
    validate_config(config, var_cfg)
    wd = Workdir(workdir)
    policy = policy_from_config(config)
    search_policy = dataclasses.replace(policy, rounding="nearest")     # before reconstruction: round to nearest
    dtype = DTYPES[config.dtype]
    settings = calib_settings(config, var_cfg)
    report = {"stages": {}, "config": config.to_dict() if hasattr(config, "to_dict") else dict(config)}

    # 1. calibration set (FP samples with their masked probabilities)
    with _timed(report, "calibration", log):
        labels = calibration.calibration_labels(config.calib.num_samples, var_cfg.num_classes, config.calib.seed)
        if wd.done("calibration"):
            arrays = wd.load_arrays("calibration")
            calib = calibration.CalibrationSet(arrays["labels"], [jnp.asarray(arrays[f"tokens_{s}"])
                                                                  for s in range(var_cfg.num_scales)], None)
        else:
            calib = calibration.generate_calibration(ck.vae_cfg, var_cfg, ck.params, labels, config.calib.seed,
                                                     settings, config.calib.batch_size, dtype,
                                                     keep_probs=config.resampling)
    # 2. weight quantizers (min-max)
    with _timed(report, "init", log):
        quant = state.init_quant_state(ck.params["var"], policy)
    # 3. θ before reconstruction
    theta_keys = calibration.per_image_keys(config.calib.seed + 1, np.arange(config.theta.num_samples))
    theta_labels = calib.labels[:config.theta.num_samples]

    def theta_stage(stage: str, stage_policy, quant, key: str):
        with _timed(report, stage, log):
            theta, note, extra = _search_theta(ck, stage_policy, quant, theta_labels, theta_keys, settings, config,
                                               dtype)
            report[key], report["sas_extra_bops"] = theta, extra
            if note:
                report["theta_note"] = note
            log(f"  θ = {theta:.6g} {note}")
        return state.set_theta(quant, theta)

    if policy.shift_and_sum:
        quant = theta_stage("theta", search_policy, quant, "theta_before_reconstruction")
    # 4. resampling
    if config.resampling and not wd.done("calibration"):
        with _timed(report, "resampling", log):
            before = resampling.frequency_mismatch_per_scale(calib.tokens, calib.probs)
            key = jax.random.PRNGKey(config.calib.seed + 10_000)
            calib.tokens = [jnp.asarray(t) for t in resampling.resample_scales(key, calib.tokens, calib.probs)]
            after = resampling.frequency_mismatch_per_scale(calib.tokens, calib.probs)
            report["frequency_mismatch"] = {"before": [float(x) for x in before], "after": [float(x) for x in after]}
    if not wd.done("calibration"):
        wd.save_arrays("calibration", labels=calib.labels, **{f"tokens_{s}": t for s, t in enumerate(calib.tokens)})
        wd.finish("calibration", resampled=bool(config.resampling),
                  frequency_mismatch=report.get("frequency_mismatch"))
    else:
        report["frequency_mismatch"] = wd.records["calibration"].get("frequency_mismatch")
    calib.probs = None                                        # free the [N, L, V] probabilities
    # 5. reconstruction
    if config.reconstruction:
        if reconstruct is None:
            raise ValueError("config.reconstruction is on but no reconstruction stage was given")
        with _timed(report, "reconstruction", log):
            quant, recon_report = reconstruct(ck, policy, quant, calib, config, os.path.join(workdir, "recon"), log)
            report["reconstruction"] = recon_report
        # 6. θ again, with the learned rounding
        if policy.shift_and_sum:
            quant = theta_stage("theta_after", policy, quant, "theta")
    if policy.shift_and_sum:
        report.setdefault("theta", report.get("theta_before_reconstruction"))
    report["bops"] = bops_report(var_cfg, policy, report.get("sas_extra_bops", 0.0))
    return PTQResult(policy, ck.params["var"], quant, report, calib)


def _search_theta(ck, policy, quant, labels, keys, settings, config, dtype):
    means, counts = theta_lib.attention_statistics(ck.vae_cfg, ck.var_cfg, ck.params, quant, policy, labels, keys,
                                                   settings, dtype)
    theta, note = theta_lib.search(ck.var_cfg, means, counts, policy.w_bits, policy.a_bits, config.theta.alpha,
                                   config.theta.n_grids)
    extra = bops.sas_extra_bops(means, counts, theta, policy.a_bits, ck.var_cfg.head_dim)
    return theta, note, float(extra)


def bops_report(var_cfg, policy: QuantPolicy, sas_extra: float = 0.0) -> dict:
    """BOPs per image: FP32/FP16 references, the quantized model, and the shift-and-sum extra at θ."""
    macs = bops.total_bops(var_cfg, 8, 8) / 64
    quantized = float(bops.total_bops(var_cfg, policy.w_bits, policy.a_bits))
    return {"fp32": macs * 32 * 32, "fp16": macs * 16 * 16, "quantized": quantized,
            "shift_and_sum_extra": sas_extra, "quantized_with_sas": quantized + sas_extra}


# --- report pieces -----------------------------------------------------------------------------------------------
def weight_errors(var_params, quant, policy: QuantPolicy) -> dict:
    """Relative L2 error ‖ŵ − w‖ / ‖w‖ of every Linear weight (with the policy's final rounding)."""
    w_hat = state.materialize_weights(var_params, quant, policy)
    flat, flat_hat = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(w_hat)
    return {"/".join(p[:-1]): float(jnp.linalg.norm(flat_hat[p] - flat[p]) / jnp.linalg.norm(flat[p]))
            for p in flat if p[-1] == "kernel" and np.ndim(flat[p]) == 2}


def activation_errors(ck: ModelCheckpoint, policy: QuantPolicy, quant, calib, num: int = 8) -> dict:
    """Relative L2 error of each Linear's quantized input on `num` calibration samples (teacher-forced, CFG)."""
    n = min(num, len(calib.labels))
    tokens = [t[:n] for t in calib.tokens]
    x = VQVAE(ck.vae_cfg).apply({"params": ck.params["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    labels = jnp.concatenate([jnp.asarray(calib.labels[:n]), jnp.full(n, ck.var_cfg.num_classes, jnp.int32)])
    model = VAR(ck.var_cfg, jnp.float32, dataclasses.replace(policy, report_errors=True))
    _, sown = jax.jit(lambda p, q: model.apply({"params": p, "quant": q}, labels, jnp.concatenate([x, x]),
                                               mutable=["intermediates"]))(ck.params["var"], quant)
    out = {}
    for path, v in traverse_util.flatten_dict(sown["intermediates"]).items():
        if path[-1] == "act_err":
            err = np.sum([np.asarray(e) for e in v], axis=0)
            out["/".join(path[:-1])] = float(np.sqrt(err[0] / max(err[1], 1e-30)))
    return out
