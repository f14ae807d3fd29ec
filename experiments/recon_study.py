"""Does AdaRound do anything? Reconstruction of a few named units at the official and other (lr, λ) points.

  python -m experiments.recon_study --config=w4a4:brecq --checkpoint=research \\
      --units=blocks_0/attn,blocks_6/ffn,head --points=1e-4:1e-5,1e-3:1e-5,1e-3:1e-4,1e-2:1e-4 \\
      --workdir=runs/recon_study --out=benchmarks/recon_study.md

Per point and unit: the fraction of weights whose learned rounding differs from nearest, the unit's error with
nearest and with the learned (hard) rounding, and the whole model's teacher-forced KL to FP on held-out FP token
maps (`varq_jax.runs.recon_study`). --config.* overrides apply to every point (recon.lr / recon.weight / recon.units
are set by --points and --units).
"""
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from varq_jax import cli

FLAGS = flags.FLAGS
COMMAND_ARGS = list(sys.argv[1:])
config_flags.DEFINE_config_file("config", None, "PTQ preset:method with AdaRound (e.g. w4a4:brecq)", lock_config=True)
flags.DEFINE_string("checkpoint", None, "FP checkpoint directory or embedded model name (default: the default model)")
flags.DEFINE_list("units", ["blocks_0/attn", "blocks_0/ffn", "head"], "reconstruction units to study")
flags.DEFINE_list("points", ["1e-4:1e-5"], "recon.lr:recon.weight points, the official first")
flags.DEFINE_integer("heldout_samples", 32, "held-out FP token maps of the KL")
flags.DEFINE_string("workdir", "runs/recon_study", "directory of the points' PTQ runs (resumable)")
flags.DEFINE_string("out", "recon_study.md", "the markdown report (its .json beside it)")


def main(argv):
    del argv
    cli.quiet_logs()
    from varq_jax.runs import recon_study
    if FLAGS.config is None:
        raise ValueError("--config is required, e.g. --config=w4a4:brecq")
    study = recon_study.Study(units=tuple(FLAGS.units), points=tuple(recon_study.parse_points(FLAGS.points)),
                              heldout_samples=FLAGS.heldout_samples)
    command = "python -m experiments.recon_study " + " ".join(shlex.quote(a) for a in COMMAND_ARGS)
    result = recon_study.run_study(FLAGS.config, study, FLAGS.workdir, FLAGS.out, checkpoint=FLAGS.checkpoint,
                                   command=command)
    print(recon_study.to_markdown(result))


if __name__ == "__main__":
    cli.configure_xla()
    sys.argv = cli.rewrite_config_argv(sys.argv)
    cli.run(main)
