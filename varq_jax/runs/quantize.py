"""What `experiments.quantize` does, as a library function: load, validate, run the pipeline, write outputs.

Outputs in WORKDIR: model/ (the quantized Orbax checkpoint: integer codes + scales), report.json, report.md,
samples.png (FP row above the quantized row, same labels and keys); WORKDIR/state/ keeps the resumable stages.
"""
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax import checkpoint, default_model, image_io, sampling
from varq_jax.quant import export, pipeline, report as report_lib
from varq_jax.runs import ptq as ptq_run


def comparison_grid(ck, policy, quant, num: int, seed: int, dtype) -> np.ndarray:
    """FP samples (top row) and quantized samples (bottom row) from the same labels and per-image keys."""
    labels = np.arange(num) % ck.var_cfg.num_classes
    settings = sampling.SamplingConfig(1.5, min(900, ck.var_cfg.vocab_size), 0.96)
    keys = jax.random.split(jax.random.PRNGKey(seed), num)
    fp, _ = sampling.Sampler(ck.vae_cfg, ck.var_cfg, settings, dtype)(ck.params, labels, keys)
    rows = [fp]
    if policy is not None:
        qimg, _ = sampling.Sampler(ck.vae_cfg, ck.var_cfg, settings, dtype, policy)(ck.params, labels, keys, quant=quant)
        rows.append(qimg)
    return image_io.make_grid(image_io.to_uint8(jnp.concatenate(rows)), ncol=num)


def quantize_command(config, checkpoint_path, workdir: str, log=print, progress=None, restart: bool = False,
                     calibration: Optional[str] = None) -> dict:
    """`progress`: a `varq_jax.progress.Progress` for live calibration and reconstruction progress (None: quiet);
    `restart`: discard stages of WORKDIR/state made with other settings (else they are refused);
    `calibration`: take the calibration set of another run (its workdir or stage directory)."""
    checkpoint_path = default_model.resolve(checkpoint_path)
    if checkpoint_path is not None and not os.path.isdir(checkpoint_path):
        raise checkpoint.CheckpointError(f"checkpoint directory {checkpoint_path!r} does not exist")
    ck = default_model.load_model(checkpoint_path)
    if ck.policy is not None:
        raise ValueError(f"{checkpoint_path!r} is already a quantized checkpoint (W{ck.policy.w_bits}A"
                         f"{ck.policy.a_bits}); quantize starts from a full-precision one")
    pipeline.validate_config(config, ck.var_cfg)              # everything checked before any output exists
    log(default_model.describe(ck))
    t0 = time.perf_counter()
    dtype = pipeline.DTYPES[config.dtype]
    if config.quantize:
        reconstruct = None
        if config.reconstruction:
            from varq_jax.quant.recon_stage import reconstruct
        result = ptq_run.run_config(ck, config, os.path.join(workdir, "state"), log=log, reconstruct=reconstruct,
                                    progress=progress, restart=restart, calibration=calibration)
        policy, quant, report = result.policy, result.quant, result.report
        report["weight_errors"] = pipeline.weight_errors(ck.params["var"], quant, policy)
        with pipeline.precision_scope(pipeline.PTQSettings.from_config(config), jnp.float32):
            report["activation_errors"] = pipeline.activation_errors(ck, policy, quant, result.calib)
    else:
        policy, quant = None, None
        report = {"stages": {}, "config": config.to_dict()}
        report["bops"] = {"fp32": pipeline.bops_report(ck.var_cfg, None)["fp32"]}
    report["model"] = default_model.describe(ck)
    from clu import parameter_overview      # lazily: the library runs where clu is absent (e.g. bare GPU images)
    report["parameter_overview"] = parameter_overview.get_parameter_overview(ck.params["var"], include_stats=False)
    report["random_weights"] = bool(ck.meta.get("random_weights", False))
    os.makedirs(workdir, exist_ok=True)
    if config.samples.num > 0:
        t = time.perf_counter()
        grid = comparison_grid(ck, policy, quant, config.samples.num, config.samples.seed, dtype)
        image_io.save_png(os.path.join(workdir, "samples.png"), grid)
        report["stages"]["samples"] = round(time.perf_counter() - t, 3)
    if config.quantize:
        meta = {"provenance": checkpoint.provenance(source="experiments.quantize", base=checkpoint_path or "default"),
                "quant_config": config.to_dict(), "theta": report.get("theta")}
        export.save_quantized(os.path.join(workdir, "model"), ck, ck.params["var"], quant, policy, meta=meta,
                              overwrite=True)
    report["stages"]["total"] = round(time.perf_counter() - t0, 3)
    report_lib.write(workdir, report)
    log(f"wrote {workdir}/report.md, report.json" + (", samples.png" if config.samples.num > 0 else "")
        + (", model/" if config.quantize else ""))
    return report
