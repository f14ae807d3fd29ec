"""Trains an embedded model: `--stage=vqvae`, then `var` (needs the VQVAE export), `classifier`, `all`, or a list.

  python -m experiments.train --config=configs/train_default.py --workdir=runs/default --stage=all

Every stage resumes from its last checkpoint in WORKDIR/<stage>/ckpt and ends by writing WORKDIR/<stage>/export
(an Orbax params/ checkpoint + info.json). Override any field with --config.<field>=value.
"""
import logging as std_logging

from absl import flags, logging
from ml_collections import config_flags

from varq_jax import cli, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_default.py", "Training configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.", required=True)
_STAGE = flags.DEFINE_list("stage", ["all"], f"Which models to train, in order: all, or some of "
                           f"{', '.join(train.STAGES)} (e.g. vqvae,classifier).")


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
    """Drops Orbax's per-save INFO lines, which would bury the progress lines."""
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_logger().addFilter(_quiet_orbax)
    stages = list(train.STAGES) if _STAGE.value == ["all"] else _STAGE.value
    unknown = [s for s in stages if s not in train.STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; valid: all, {', '.join(train.STAGES)}")
    for name in stages:
        path = train.STAGES[name].train_and_export(_CONFIG.value, _WORKDIR.value)
        if not path:
            logging.info("stage %s stopped before its last step (stop_at_step); rerun to continue", name)
            return
        logging.info("stage %s exported to %s", name, path)


if __name__ == "__main__":
    cli.configure_xla()
    cli.run(main)
