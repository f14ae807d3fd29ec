"""The reconstruction stage of the PTQ pipeline: settings → `reconstruct_model`, records → report rows."""
import time

import jax

from varq_jax import progress as progress_lib
from varq_jax.quant.units import recon_targets
from varq_jax.quant.reconstruction import reconstruct_model


def reconstruct(ck, policy, quant, calib, settings, workdir, log, progress=None):
    """BRECQ/AdaRound over every unit in model order; resumable in `workdir`. Returns (quant with α, report).
    With a `progress.Progress`, each unit's loop reports iteration, loss and the stage's ETA after every chunk."""
    rc = settings.recon
    modules = {}
    units = [t.name for t in recon_targets(ck.var_cfg) if not rc.units or t.name in rc.units]
    started, unit_start = time.perf_counter(), {}

    def chunk(unit, done, total, loss):
        t0 = unit_start.setdefault(unit, time.perf_counter())
        if done == total and not progress.live:
            return                                   # the unit's summary line follows
        i = units.index(unit)
        frac = (i + done / total) / len(units)
        left = progress_lib.eta(int(1000 * frac), 1000, time.perf_counter() - started)
        progress.update(f"  {unit:<24} iter {done}/{total}  loss {loss:.4g}  "
                        f"({time.perf_counter() - t0:.0f} s; unit {i + 1}/{len(units)}{'; ' + left if left else ''})",
                        final=done == total)

    def done(record, _):
        row = modules[record["module"]] = _row(record)
        log(f"  {record['module']:<24} loss {row['loss_start'] or 0:.4g} → {row['loss_end'] or 0:.4g}   "
            f"({row['time_s']:.1f} s: capture {row['capture_s'] or 0:.1f} s, α loop {row['optimize_s'] or 0:.1f} s)")

    result = reconstruct_model(ck.vae_cfg, ck.var_cfg, ck.params, quant, calib.labels, calib.tokens, policy, rc,
                               key=recon_key(settings), workdir=workdir, callback=done,
                               progress=chunk if progress is not None else None)
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
