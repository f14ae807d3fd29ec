"""The ablation table in one command: PTQ presets × methods on one checkpoint, evaluated alike, one RESULTS.md.

  python -m experiments.ablate --presets=w8a8,w6a6,w4a8,w4a6,w4a4 \\
      --methods=baseline,brecq,brecq_sas,brecq_resample,full --eval.num_images=500 --out=RESULTS.md \\
      --workdir=runs/ablate [--checkpoint DIR] [--config.recon.iters=1000 ...]

  python -m experiments.ablate --merge=parts/a.json,parts/b.json --out=RESULTS.md   # one table from parts

Without --checkpoint the embedded default model is used. --config.<field>=value overrides go to every PTQ config
(checked against each preset's fields); the evaluation settings of every row are --eval.<field>=value
(configs/eval.py: num_images, num_per_class, seed, cfg, top_k, top_p, num_real); paths and execution choices are
flags. Runs whose outputs exist in --workdir are skipped; stopped ones resume.
The metrics are the in-project classifier's (class accuracy, Fréchet distances of its features), not FID.
"""
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from varq_jax import cli

FLAGS = flags.FLAGS
EVAL_SETTINGS = os.path.join(cli.CONFIG_DIR, "eval.py")
RENAMED = ("num_images", "seed", "cfg", "top_k", "top_p", "num_real")
COMMAND_ARGS = list(sys.argv[1:])   # as typed, for the results' record
if __name__ == "__main__":          # before the config flag reads its --eval.* overrides
    cli.refuse_renamed(sys.argv, RENAMED, flag="eval")
    sys.argv = cli.rewrite_config_argv(sys.argv, flag="eval", default=EVAL_SETTINGS)
config_flags.DEFINE_config_file("eval", EVAL_SETTINGS, "evaluation settings of every row (configs/eval.py)",
                                lock_config=True)
flags.DEFINE_list("presets", ["w8a8", "w6a6", "w4a8", "w4a6", "w4a4"], "PTQ presets (the FP model is always a row)")
flags.DEFINE_list("methods", ["baseline", "brecq", "brecq_sas", "brecq_resample", "full"], "PTQ methods")
flags.DEFINE_string("checkpoint", None, "FP checkpoint directory (default: the embedded default model)")
flags.DEFINE_string("workdir", "runs/ablate", "directory of the runs (PTQ and evaluation outputs, resumable)")
flags.DEFINE_string("out", "RESULTS.md", "the markdown table (its .json twin is written beside it)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype of generation")
flags.DEFINE_integer("per_device_batch", 16, "images per device per generation step")
flags.DEFINE_integer("feature_batch", 32, "images per device per step of feature extraction")
flags.DEFINE_string("classifier", None, "exported shapes classifier (default: the embedded one)")
flags.DEFINE_integer("diag_samples", 8, "calibration samples of the A·V error diagnostic (0: skip it)")
flags.DEFINE_list("merge", None, "instead of running: merge these ablation JSONs (invocations that ran side by side on "
                  "one --workdir, e.g. one per GPU) into --out; the A·V diagnostic is recomputed on --checkpoint")

_OVERRIDES = []


def main(argv):
    del argv
    cli.quiet_logs()
    from varq_jax.eval.evaluate import EvalConfig
    from varq_jax.runs import ablation, results_table
    e = FLAGS.eval
    config = EvalConfig(num_images=e.num_images, num_per_class=e.num_per_class, seed=e.seed, cfg=e.cfg,
                        top_k=e.top_k, top_p=e.top_p, num_real=e.num_real, dtype=FLAGS.dtype,
                        per_device_batch=FLAGS.per_device_batch, feature_batch=FLAGS.feature_batch,
                        classifier=FLAGS.classifier)
    command = "python -m experiments.ablate " + " ".join(shlex.quote(a) for a in COMMAND_ARGS)
    if FLAGS.merge:
        result = _merge(command)
    else:
        if e.num_images < 0 or (e.num_images == 0 and e.num_per_class <= 0):
            raise ValueError(f"eval.num_images must be positive (or 0 with eval.num_per_class > 0), got "
                             f"{e.num_images} / {e.num_per_class}")
        plan = cli.ablation_plan(FLAGS.presets, FLAGS.methods, cli.parse_override_args(_OVERRIDES))
        result = ablation.run_ablation(plan, config, FLAGS.workdir, FLAGS.out, checkpoint=FLAGS.checkpoint,
                                       diag_samples=FLAGS.diag_samples, command=command)
    print("\n".join(results_table.table(result["rows"])))


def _merge(command: str) -> dict:
    import json
    from varq_jax import default_model
    from varq_jax.runs import ablation, results_table
    if _OVERRIDES:
        raise ValueError("--config.* overrides apply to runs; a merge takes the parts' settings as they are")
    parts = []
    for path in FLAGS.merge:
        try:
            with open(path) as f:
                parts.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read ablation result {path!r}: {e}") from None
        if not isinstance(parts[-1], dict) or "rows" not in parts[-1] or "diagnostics" not in parts[-1]:
            raise ValueError(f"{path!r} is not an ablation result (no rows/diagnostics)")
    if not FLAGS.out.endswith(".md"):
        raise ValueError(f"out must be a markdown file (.md), got {FLAGS.out!r}")
    ck = default_model.load_model(FLAGS.checkpoint) if FLAGS.diag_samples > 0 else None
    result = ablation.merge(parts, ck=ck, workdir=FLAGS.workdir, diag_samples=FLAGS.diag_samples, command=command,
                            method_order=cli.METHODS, make_plan=cli.ablation_plan)
    results_table.write(FLAGS.out, result)
    print(f"wrote {FLAGS.out} and {FLAGS.out[:-3]}.json")
    return result


if __name__ == "__main__":
    cli.configure_xla()
    _OVERRIDES[:] = [a for a in sys.argv[1:] if a.startswith("--config.")]
    sys.argv = [a for a in sys.argv if not a.startswith("--config.")]
    cli.run(main)
