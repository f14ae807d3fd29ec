"""The reconstruction stage of the PTQ pipeline: config → `reconstruct_model`, records → report rows."""
import jax

from varq_jax.quant.reconstruction import ReconConfig, reconstruct_model


def recon_config(config) -> ReconConfig:
    r = config.recon
    if r.inputs not in ("fp", "quant"):
        raise ValueError(f"recon.inputs must be 'fp' or 'quant', got {r.inputs!r}")
    return ReconConfig(iters=r.iters, batch_size=r.batch_size, lr=r.lr, weight=r.weight, p=r.p,
                       b_range=(r.b_start, r.b_end), warmup=r.warmup, quantized_inputs=r.inputs == "quant")


def reconstruct(ck, policy, quant, calib, config, workdir, log):
    """BRECQ/AdaRound over every unit in model order; resumable in `workdir`. Returns (quant with α, report)."""
    rc = recon_config(config)
    modules = {}

    def progress(record, _):
        row = modules[record["module"]] = _row(record)
        log(f"  {record['module']:<24} loss {row['loss_start'] or 0:.4g} → {row['loss_end'] or 0:.4g}   "
            f"({row['time_s']:.1f} s: capture {row['capture_s'] or 0:.1f} s, α loop {row['optimize_s'] or 0:.1f} s)")

    result = reconstruct_model(ck.vae_cfg, ck.var_cfg, ck.params, quant, calib.labels, calib.tokens, policy, rc,
                               key=jax.random.PRNGKey(config.calib.seed + 20_000), workdir=workdir,
                               callback=progress)
    for r in result.records:                     # units finished by an earlier (interrupted) run
        modules.setdefault(r["module"], _row(r))
    return result.quant, {"modules": modules, "config": rc.to_dict()}


def _row(record: dict) -> dict:
    """A unit's line of the report: losses, errors and where its time went (capture vs the α loop)."""
    return {"loss_start": record.get("rec_loss_first"), "loss_end": record.get("rec_loss_last"),
            "error_nearest": record.get("error_nearest"), "error_hard": record.get("error_hard"),
            "time_s": record.get("seconds"), "capture_s": record.get("capture_seconds"),
            "optimize_s": record.get("optimize_seconds")}
