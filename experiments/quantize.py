"""Shift-and-Sum post-training quantization of a VAR; writes the quantized checkpoint, a report and a grid.

  python -m experiments.quantize --config=w4a6 [--checkpoint DIR] [--workdir runs/w4a6] [--config.recon.iters=100]

Without --checkpoint the embedded default model is quantized. A stopped run started again with the same
--workdir resumes (finished stages and reconstructed modules are kept in WORKDIR/state).
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from varq_jax import cli
from varq_jax.quant import workflow

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "PTQ preset name (w4a6, ...) or config file", lock_config=True)
flags.DEFINE_string("checkpoint", None, "FP checkpoint directory (default: the embedded default model)")
flags.DEFINE_string("workdir", None, "output directory (default: runs/<preset>)")
flags.DEFINE_bool("progress", True, "live progress of calibration and reconstruction (a line rewritten on a "
                  "terminal, one line every 30 s otherwise)")


def main(argv):
    del argv
    cli.quiet_logs()
    if FLAGS.config is None:
        raise app.UsageError(f"--config is required; presets: {', '.join(cli.presets())}")
    preset = os.path.basename(FLAGS["config"].config_filename.split(":")[0])[:-len(".py")]
    run_name = preset + (f"_{FLAGS.config.method}" if FLAGS.config.quantize else "")
    from varq_jax.progress import Progress
    workflow.quantize_command(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir or os.path.join("runs", run_name),
                              progress=Progress() if FLAGS.progress else None)


if __name__ == "__main__":
    cli.configure_xla()
    sys.argv = cli.rewrite_config_argv(sys.argv)
    cli.run(main)
