"""The reconstruction stage of the PTQ pipeline: settings → `reconstruct_model`, records → report rows."""
import jax

from varq_jax.quant.reconstruction import reconstruct_model


def reconstruct(ck, policy, quant, calib, settings, workdir, log):
    """BRECQ/AdaRound over every unit in model order; resumable in `workdir`. Returns (quant with α, report)."""
    rc = settings.recon
    modules = {}

    def progress(record, _):
        row = modules[record["module"]] = _row(record)
        log(f"  {record['module']:<24} loss {row['loss_start'] or 0:.4g} → {row['loss_end'] or 0:.4g}   "
            f"({row['time_s']:.1f} s: capture {row['capture_s'] or 0:.1f} s, α loop {row['optimize_s'] or 0:.1f} s)")

    result = reconstruct_model(ck.vae_cfg, ck.var_cfg, ck.params, quant, calib.labels, calib.tokens, policy, rc,
                               key=recon_key(settings), workdir=workdir, callback=progress)
    for r in result.records:                     # units finished by an earlier (interrupted) run
        modules.setdefault(r["module"], _row(r))
    return result.quant, {"modules": modules, "config": rc.to_dict()}


def recon_key(settings):
    """The reconstruction's PRNG key: derived from the calibration seed, as every seed of a run."""
    return jax.random.PRNGKey(settings.calib.seed + 20_000)


def _row(record: dict) -> dict:
    """A unit's line of the report: losses, errors and where its time went (capture vs the α loop)."""
    return {"loss_start": record.get("rec_loss_first"), "loss_end": record.get("rec_loss_last"),
            "error_nearest": record.get("error_nearest"), "error_hard": record.get("error_hard"),
            "time_s": record.get("seconds"), "capture_s": record.get("capture_seconds"),
            "optimize_s": record.get("optimize_seconds")}
