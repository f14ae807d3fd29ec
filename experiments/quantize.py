"""Shift-and-Sum post-training quantization of a VAR; writes the quantized checkpoint, a report and a grid.

  python -m experiments.quantize --config=w4a6[:METHOD] [--checkpoint=DIR] [--workdir=DIR] [--config.recon.iters=100]

Without --checkpoint the embedded default model is quantized. The default workdir is runs/<preset>_<method>
(runs/w4a6_full for --config=w4a6). Finished stages are kept in WORKDIR/state with the fingerprint of the
settings that made them: a stopped run started again resumes; a run with other settings on the same workdir
is refused naming the fields that differ, unless --restart discards the stale stages. --calibration=DIR takes
the calibration set of another run (verified), so several methods share one set.

Presets: fp, w8a8, w6a6, w4a8, w4a6, w4a4 (each with :METHOD — baseline, brecq, brecq_sas, brecq_resample, full,
litevar, full_litevar, ...; default full). Fields (--config.FIELD=VALUE): w_bits, a_bits, rules, fp_modules,
dtype, matmul_precision, calib.{num_samples,seed,cfg,top_k,top_p,batch_size,dtype}, theta.{alpha,n_grids,
num_samples}, recon.{iters,batch_size,lr,weight,p,b_start,b_end,warmup,inputs,units}, samples.{num,seed}, ...
(an unknown field is refused with the full list).
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from varq_jax import cli
from varq_jax.runs import quantize as quantize_run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "PTQ preset[:method] (" + ", ".join(cli.presets()) +
                                ") or a config file", lock_config=True)
flags.DEFINE_string("checkpoint", None, "FP checkpoint directory (default: the embedded default model)")
flags.DEFINE_string("workdir", None, "output directory (default: runs/<preset>_<method>, e.g. runs/w4a6_full)")
flags.DEFINE_bool("restart", False, "discard stages of WORKDIR/state made with other settings (else: refused)")
flags.DEFINE_string("calibration", None, "take the calibration set of another run (its workdir, or "
                    "WORKDIR/state/calibration); its settings replace calib.*")
flags.DEFINE_bool("progress", True, "live progress of calibration and reconstruction (a line rewritten on a "
                  "terminal, one line every 30 s otherwise)")


def main(argv):
    del argv
    cli.quiet_logs()
    if FLAGS.config is None:
        raise ValueError(f"--config is required; presets: {', '.join(cli.presets())}")
    preset = os.path.basename(FLAGS["config"].config_filename.split(":")[0])[:-len(".py")]
    run_name = preset + (f"_{FLAGS.config.method}" if FLAGS.config.quantize else "")
    from varq_jax.progress import Progress
    quantize_run.quantize_command(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir or os.path.join("runs", run_name),
                                  progress=Progress() if FLAGS.progress else None, restart=FLAGS.restart,
                                  calibration=FLAGS.calibration)


if __name__ == "__main__":
    cli.configure_xla()
    sys.argv = cli.rewrite_config_argv(sys.argv)
    cli.run(main)
