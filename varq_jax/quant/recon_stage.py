"""The reconstruction stage of the PTQ pipeline: settings → `reconstruct_model`, records → report rows."""
import time

import jax

from varq_jax import progress as progress_lib
from varq_jax.quant.units import recon_targets
from varq_jax.quant.reconstruction import reconstruct_model


def progress_line(unit: str, done: int, total: int, loss: float, unit_s: float, index: int, n_units: int,
                  stage_s: float, after_s: float = 0.0) -> str:
    """One reconstruction progress line: the unit's iteration and loss, the stage's ETA (from the fraction of all
    units' iterations done) and the run's (the stage's plus `after_s`, the estimated time of the stages after it)."""
    frac = (index + done / total) / n_units
    left = progress_lib.seconds_left(int(1000 * frac), 1000, stage_s)
    etas = "" if left is None else f"; ETA {progress_lib.duration(left)}" + (
        f", run ETA {progress_lib.duration(left + after_s)}" if after_s > 0 else "")
    return f"  {unit:<24} iter {done}/{total}  loss {loss:.4g}  ({unit_s:.0f} s; unit {index + 1}/{n_units}{etas})"


def reconstruct(ck, policy, quant, calib, settings, workdir, log, progress=None, after_s: float = 0.0):
    """BRECQ/AdaRound over every unit in model order; resumable in `workdir`. Returns (quant with α, report).
    With a `progress.Progress`, each unit's loop reports iteration, loss, the stage's ETA and the run's (`after_s`:
    the estimated seconds of the stages after reconstruction) after every chunk."""
    rc = settings.recon
    modules = {}
    units = [t.name for t in recon_targets(ck.var_cfg) if not rc.units or t.name in rc.units]
    started, unit_start = time.perf_counter(), {}

    def chunk(unit, done, total, loss):
        t0 = unit_start.setdefault(unit, time.perf_counter())
        if done == total and not progress.live:
            return                                   # the unit's summary line follows
        now = time.perf_counter()
        progress.update(progress_line(unit, done, total, loss, now - t0, units.index(unit), len(units),
                                      now - started, after_s), final=done == total)

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
