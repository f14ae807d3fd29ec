"""Ships trained exports as the embedded default model (varq_jax/assets/default).

  python -m experiments.ship_default --workdir=runs/default --commit=<sha> --device="NVIDIA H100" --date=2026-11-26
  python -m experiments.ship_default --model=research --workdir=runs/research --commit=<sha> --device=... --date=...
"""

from absl import app, flags

from varq_jax import cli, default_model
from varq_jax.train.ship import MODELS, ship_default

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "default", list(MODELS), "which embedded model the exports become")
flags.DEFINE_string("workdir", "runs/default", "training workdir holding vqvae/, var/, classifier/ exports")
flags.DEFINE_string("commit", None, "commit the training ran at", required=True)
flags.DEFINE_string("device", None, "card the training ran on", required=True)
flags.DEFINE_string("date", None, "training date", required=True)


def main(argv):
    del argv
    cli.quiet_logs()
    name, command = MODELS[FLAGS.model]
    out = ship_default(FLAGS.workdir, str(default_model.ASSETS / FLAGS.model), commit=FLAGS.commit,
                       device=FLAGS.device, date=FLAGS.date, command=command, name=name)
    print(f"shipped {out}")


if __name__ == "__main__":
    cli.configure_xla()
    app.run(main)
