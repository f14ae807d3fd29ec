"""The Shift-and-Sum PTQ pipeline: calibration → weight-quantizer init → θ → resampling → reconstruction → θ.

`ptq(model, policy, settings, workdir)` runs it on typed settings (`settings.py`); `run_ptq(ck, config, workdir)` is
what `python -m experiments.quantize` runs: the config becomes (policy, settings) once, then `ptq`. Each finished
stage leaves its result in `workdir` (written atomically), so a stopped run resumes where it stopped;
reconstruction resumes from its last finished module. Stage wall times, θ, BOPs per site and per-layer
quantization errors go into the report.
"""
import contextlib
import dataclasses
import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from varq_jax import fingerprint, progress as progress_lib, sampling
from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import (
    bops,
    calibration,
    observe,
    registry,
    resampling,
    rules,
    state,
    units,
)
from varq_jax.quant import theta as theta_lib
from varq_jax.quant.policy import QuantPolicy
from varq_jax.quant.settings import PTQSettings

DTYPES = sampling.DTYPES


def config_rules(config) -> tuple:
    """The rule table a config asks for: the user's `rules`, then the method's (e.g. LiteVAR's fc2 rule)."""
    out = []
    for field in ("rules", "method_rules"):
        for r in config.get(field, ()) or ():
            try:
                out.append(rules.as_rule(r))
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
    return tuple(out)


def policy_from_config(config) -> QuantPolicy:
    """The rule table of a config: its rules, then what w_bits / a_bits / fp_modules / the switches expand to."""
    if config.rounding not in ("nearest", "adaround"):
        raise ValueError(f"rounding must be 'nearest' or 'adaround', got {config.rounding!r}")
    if config.reconstruction and config.rounding != "adaround":
        raise ValueError("reconstruction learns AdaRound rounding: set rounding='adaround'")
    return QuantPolicy(w_bits=config.w_bits, a_bits=config.a_bits, weights=config.quantize_weights,
                       acts=config.quantize_acts, attn=config.quantize_attn, shift_and_sum=config.shift_and_sum,
                       phase="hard" if config.rounding == "adaround" and config.reconstruction else "nearest",
                       fp_modules=tuple(config.fp_modules), rules=config_rules(config),
                       operand_dtype=config.get("operand_dtype", "auto"))


def from_config(config, var_cfg) -> tuple:
    """(policy, settings) of a PTQ config, every field checked against the model before any work."""
    policy = policy_from_config(config)
    settings = PTQSettings.from_config(config)
    if config.samples.num < 0:
        raise ValueError(f"samples.num (comparison grid size, 0 = none) must be >= 0, got {config.samples.num}")
    if config.quantize:
        validate(policy, settings, var_cfg)
    return policy, settings


def validate(policy: QuantPolicy, settings: PTQSettings, var_cfg) -> None:
    """Every check against the model that can fail, before any work (rules, groups, sampling settings)."""
    policy.check(var_cfg)                                  # every rule matches a module; groups divide
    sampling.validate(calib_settings(settings, var_cfg), var_cfg, np.zeros(1, np.int32))
    names = [t.name for t in units.recon_targets(var_cfg)]
    unknown = [u for u in settings.recon.units if u not in names]
    if unknown:
        raise ValueError(f"recon.units: unknown reconstruction units {unknown}; valid: {', '.join(names)}")


def validate_config(config, var_cfg) -> None:
    from_config(config, var_cfg)


def precision_scope(settings: PTQSettings, dtype):
    """Float32 programs at HIGHEST matmul precision (JAX's default float32 matmul is TF32 on GPUs and bf16 on
    TPUs); 16-bit programs are left as they are."""
    if jnp.dtype(dtype) == jnp.float32 and settings.matmul_precision == "highest":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def calib_settings(settings, var_cfg) -> sampling.SamplingConfig:
    """The calibration sampler's settings (of PTQSettings, or a config's calib fields)."""
    c = settings.calib
    return sampling.SamplingConfig(c.cfg, min(c.top_k, var_cfg.vocab_size), c.top_p)


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


class NoStore:
    """The stage-store protocol of `varq_jax.runs.store.StageStore`, keeping nothing: every stage is made."""

    def get(self, stage: str, fp):
        return None

    def put(self, stage: str, fp, arrays: dict, result: Optional[dict] = None) -> None:
        pass

    def making(self, stage: str, fp):
        return contextlib.nullcontext()

    def scratch(self, stage: str) -> Optional[str]:
        return None


def stage_fingerprints(var_cfg, model_id: str, policy: QuantPolicy, settings: PTQSettings) -> dict:
    """{stage: fingerprint} of the stages a run makes, in order. Each fingerprint holds everything its stage
    depends on in user-level names (its upstream stages' fields included), so a difference makes that stage and
    every stage after it stale, and the differing names are the fields a user set."""
    calib = fingerprint.fingerprint(model=model_id, calib={**dataclasses.asdict(settings.calib),
                                                           "dtype": settings.calib_dtype},
                                    matmul_precision=settings.matmul_precision)
    quant = fingerprint.fingerprint(policy.to_dict(), policy_class=f"{type(policy).__module__}.{type(policy).__name__}")
    init = {**calib, **quant}
    plan = {"calibration": calib}
    sas = bool(theta_lib.shift_and_sum_blocks(var_cfg, policy))
    if sas:
        init = plan["theta"] = {**init, "dtype": settings.dtype, **fingerprint.fingerprint(theta=settings.theta)}
    data = calib
    if settings.resampling:
        data = plan["resampling"] = {**calib, "resampling": True}
    if settings.reconstruction:
        recon = plan["reconstruction"] = {**data, **init, **fingerprint.fingerprint(recon=settings.recon.to_dict())}
        if sas:
            plan["theta_after"] = dict(recon)
    return plan


def ptq(ck: ModelCheckpoint, policy: QuantPolicy, settings: PTQSettings, log: Callable = print,
        reconstruct: Optional[Callable] = None, report_config: Optional[dict] = None, progress=None,
        store=None, plan: Optional[dict] = None) -> PTQResult:
    """The whole pipeline on a loaded FP model. `reconstruct(ck, policy, quant, calib, settings, workdir, log)`
    returns the quant tree with learned α (the BRECQ/AdaRound stage, `recon_stage.reconstruct`); needed when
    `settings.reconstruction` is on. `store` keeps finished stages under the fingerprints of `plan`
    (`stage_fingerprints`; `varq_jax.runs.store`): a stage found there is reused, not made. `progress` (a
    `varq_jax.progress.Progress`) reports calibration batches and reconstruction chunks as they finish."""
    var_cfg = ck.var_cfg
    validate(policy, settings, var_cfg)
    if settings.reconstruction and reconstruct is None:
        raise ValueError("settings.reconstruction is on but no reconstruction stage was given")
    if store is None:
        store, plan = NoStore(), None
    plan = plan or {k: {} for k in stage_fingerprints(var_cfg, "", policy, settings)}
    search_policy = dataclasses.replace(policy, phase="nearest")     # before reconstruction: round to nearest
    dtype = DTYPES[settings.dtype]
    sampling_settings = calib_settings(settings, var_cfg)
    cs = settings.calib
    report = {"stages": {}, "config": report_config or {**settings.to_dict(), **policy.to_dict()}}

    def stage(name: str, make: Callable):
        """(arrays, result) of a stage: from the store when it holds it, else made (under its lock) and kept."""
        got = store.get(name, plan[name])
        if got is None:
            with store.making(name, plan[name]):
                got = store.get(name, plan[name])         # a run sharing the workdir may have made it meanwhile
                if got is None:
                    got = make()
                    store.put(name, plan[name], *got)
                    return got
        log(f"  [{name}] reused from the workdir")
        return got

    # 1. calibration set (FP samples; the masked probabilities stay in memory for resampling)
    fresh = {}

    def make_calibration():
        labels = calibration.calibration_labels(cs.num_samples, var_cfg.num_classes, cs.seed)
        with precision_scope(settings, DTYPES[settings.calib_dtype]):
            started = time.perf_counter()
            report_batch = None if progress is None else (
                lambda done, total: progress.update(
                    f"  calibration: {done}/{total} samples  {progress_lib.eta(done, total, time.perf_counter() - started)}",
                    final=done == total))
            calib = calibration.generate_calibration(ck.vae_cfg, var_cfg, ck.params, labels, cs.seed,
                                                     sampling_settings, cs.batch_size, DTYPES[settings.calib_dtype],
                                                     keep_probs=settings.resampling, progress=report_batch)
        fresh["probs"] = calib.probs
        return {"labels": calib.labels, "tokens": list(calib.tokens)}, {}

    with _timed(report, "calibration", log):
        arrays, _ = stage("calibration", make_calibration)
        calib = calibration.CalibrationSet(np.asarray(arrays["labels"]), [jnp.asarray(t) for t in arrays["tokens"]],
                                           fresh.get("probs"))
    # 2. weight quantizers (each site's grid at its rule), calibrated activation-quantizer state
    with _timed(report, "init", log):
        quant = state.init_quant_state(ck.params["var"], policy)
        if _stateful_acts(policy, var_cfg):
            with precision_scope(settings, jnp.float32):
                quant = observe.observe_activations(ck.vae_cfg, var_cfg, ck.params, quant, policy, calib.labels,
                                                    calib.tokens, batch_size=cs.batch_size)
    # 3. θ before reconstruction
    theta_keys = calibration.per_image_keys(cs.seed + 1, np.arange(settings.theta.num_samples))
    theta_labels = calib.labels[:settings.theta.num_samples]

    def theta_stage(name: str, stage_policy, quant, key: str):
        def make():
            with precision_scope(settings, dtype):
                theta, note, extra = _search_theta(ck, stage_policy, quant, theta_labels, theta_keys,
                                                   sampling_settings, settings, dtype)
            return {}, {"theta": theta, "note": note, "sas_extra_bops": extra}
        with _timed(report, name, log):
            _, r = stage(name, make)
            report[key], report["sas_extra_bops"] = r["theta"], r["sas_extra_bops"]
            if r["note"]:
                report["theta_note"] = r["note"]
            log(f"  θ = {r['theta']:.6g} {r['note']}")
        return state.set_theta(quant, r["theta"])

    sas = "theta" in plan
    if sas:
        quant = theta_stage("theta", search_policy, quant, "theta_before_reconstruction")
    # 4. resampling (the probabilities recomputed teacher-forced when the calibration set came from disk)
    if settings.resampling:
        def make_resampling():
            probs = calib.probs
            if probs is None:
                log("  recomputing the calibration probabilities teacher-forced")
                with precision_scope(settings, DTYPES[settings.calib_dtype]):
                    probs = calibration.teacher_forced_probs(ck.vae_cfg, var_cfg, ck.params, calib.labels,
                                                             calib.tokens, sampling_settings, cs.batch_size,
                                                             DTYPES[settings.calib_dtype])
            before = resampling.frequency_mismatch_per_scale(calib.tokens, probs)
            tokens = resampling.resample_scales(jax.random.PRNGKey(cs.seed + 10_000), calib.tokens, probs)
            after = resampling.frequency_mismatch_per_scale(tokens, probs)
            return {"tokens": [np.asarray(t) for t in tokens]}, {
                "frequency_mismatch": {"before": [float(x) for x in before], "after": [float(x) for x in after]}}

        with _timed(report, "resampling", log):
            arrays, r = stage("resampling", make_resampling)
            calib.tokens = [jnp.asarray(t) for t in arrays["tokens"]]
            report["frequency_mismatch"] = r["frequency_mismatch"]
    calib.probs = fresh["probs"] = None                       # free the [N, L, V] probabilities
    # 5. reconstruction
    if settings.reconstruction:
        def make_reconstruction():
            # the run's ETA: the stage's plus θ with the learned rounding, as long as θ took before it
            after = report["stages"].get("theta", 0.0) if sas else 0.0
            extra = {} if progress is None else {"progress": progress, "after_s": after}
            with precision_scope(settings, jnp.float32):
                learned, recon_report = reconstruct(ck, policy, quant, calib, settings,
                                                    store.scratch("reconstruction"), log, **extra)
            return {"quant": learned}, recon_report

        with _timed(report, "reconstruction", log):
            arrays, report["reconstruction"] = stage("reconstruction", make_reconstruction)
            quant = jax.tree.map(jnp.asarray, arrays["quant"])
        # 6. θ again, with the learned rounding
        if sas:
            quant = theta_stage("theta_after", policy, quant, "theta")
    if sas:
        report.setdefault("theta", report.get("theta_before_reconstruction"))
    report["bops"] = bops_report(var_cfg, policy, report.get("sas_extra_bops", 0.0))
    report["sites"] = site_table(var_cfg, policy)
    report["rules"] = [r.to_dict() for r in policy.table]
    return PTQResult(policy, ck.params["var"], quant, report, calib)


def quantize(model: ModelCheckpoint, policy: QuantPolicy, settings: PTQSettings = PTQSettings(),
             log: Callable = print) -> PTQResult:
    """Post-training quantization of a loaded FP model under a rule table: the whole pipeline in memory
    (reconstruction when `settings.reconstruction`); `varq_jax.runs.ptq.run` is the same with a resumable,
    fingerprinted workdir. The result's policy has phase 'hard' where reconstruction ran."""
    from varq_jax.quant.recon_stage import reconstruct
    if model.policy is not None:
        raise ValueError("the model is already quantized; quantize starts from a full-precision one")
    if settings.reconstruction:
        policy = dataclasses.replace(policy, phase="hard")
    return ptq(model, policy, settings, log, reconstruct)


def _stateful_acts(policy: QuantPolicy, var_cfg) -> bool:
    for s in rules.model_sites(var_cfg):
        if s.kind == rules.LINEAR:
            r = policy.rule_for(s.path)
            if r.acts and registry.act_quantizer(r.act_spec(s.name, s.in_features)[0]).stateful:
                return True
    return False


def _search_theta(ck, policy, quant, labels, keys, sampling_settings, settings: PTQSettings, dtype):
    means, counts, bits = theta_lib.attention_statistics(ck.vae_cfg, ck.var_cfg, ck.params, quant, policy, labels,
                                                         keys, sampling_settings, dtype)
    theta, note = theta_lib.search(ck.var_cfg, means, counts, bits, policy, settings.theta.alpha,
                                   settings.theta.n_grids)
    extra = bops.sas_extra_bops(means, counts, theta, bits, ck.var_cfg.head_dim)
    return theta, note, float(extra)


def bops_report(var_cfg, policy: Optional[QuantPolicy], sas_extra: float = 0.0) -> dict:
    """BOPs per image: FP32/FP16 references, the quantized model (per-site rules), the shift-and-sum extra at θ."""
    macs = bops.total_macs(var_cfg)
    out = {"fp32": float(macs * 32 * 32), "fp16": float(macs * 16 * 16)}
    if policy is not None:
        quantized = float(bops.total_bops(var_cfg, policy))
        out.update(quantized=quantized, shift_and_sum_extra=sas_extra, quantized_with_sas=quantized + sas_extra)
    return out


def site_table(var_cfg, policy: QuantPolicy) -> list:
    """One row per site: the rules that set it, its bits, granularity, quantizers and BOPs per image."""
    charged = {s.path: s for s in bops.site_bops(var_cfg, policy)}
    rows = []
    for s in rules.model_sites(var_cfg):
        r = policy.rule_for(s.path)
        row = {"site": s.path, "kind": s.kind, "rules": rules.matched_patterns(r), "bops": charged[s.path].bops}
        if s.kind == rules.LINEAR:
            group = r.weight_group(s.in_features)
            act, a_group = r.act_spec(s.name, s.in_features)
            row.update(weights=f"W{r.w_bits} " + (f"group-{group}" if group else "per-channel") +
                       f" {r.weight_quantizer} {r.rounding}" if r.weights else "FP",
                       acts=f"A{r.a_bits} {act}" + (f"-{a_group}" if a_group else "") if r.acts else "FP")
        else:
            row.update(weights="", acts=(f"A{r.a_bits} " + ("shift-and-sum" if r.shift_and_sum else "plain"))
                       if r.attn else "FP")
        rows.append(row)
    return rows


# --- report pieces -----------------------------------------------------------------------------------------------
def weight_errors(var_params, quant, policy: QuantPolicy) -> dict:
    """Relative L2 error ‖ŵ − w‖ / ‖w‖ of every weight-quantized Linear (with the policy's final rounding)."""
    w_hat = state.materialize_weights(var_params, quant, policy)
    flat, flat_hat = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(w_hat)
    return {"/".join(p[:-1]): float(jnp.linalg.norm(flat_hat[p] - flat[p]) / jnp.linalg.norm(flat[p]))
            for p in flat if p[-1] == "kernel" and np.ndim(flat[p]) == 2 and policy.rule_for("/".join(p[:-1])).weights}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sown_errors(var_cfg, policy, params, quant, labels, x):
    _, sown = VAR(var_cfg, jnp.float32, policy).apply({"params": params, "quant": quant}, labels, x,
                                                      mutable=["intermediates"])
    return sown


def activation_errors(ck: ModelCheckpoint, policy: QuantPolicy, quant, calib, num: int = 8) -> dict:
    """Relative L2 error of each Linear's quantized input on `num` calibration samples (teacher-forced, CFG)."""
    n = min(num, len(calib.labels))
    tokens = [t[:n] for t in calib.tokens]
    x = VQVAE(ck.vae_cfg).apply({"params": ck.params["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    labels = jnp.concatenate([jnp.asarray(calib.labels[:n]), jnp.full(n, ck.var_cfg.num_classes, jnp.int32)])
    sown = _sown_errors(ck.var_cfg, dataclasses.replace(policy, report_errors=True), ck.params["var"], quant, labels,
                        jnp.concatenate([x, x]))
    out = {}
    for path, v in traverse_util.flatten_dict(sown["intermediates"]).items():
        if path[-1] == "act_err":
            err = np.sum([np.asarray(e) for e in v], axis=0)
            out["/".join(path[:-1])] = float(np.sqrt(err[0] / max(err[1], 1e-30)))
    return out
