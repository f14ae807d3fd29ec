"""The ablation table in one command: PTQ presets × methods on one checkpoint, evaluated alike, one RESULTS.md.

  python -m experiments.ablate --presets=w8a8,w6a6,w4a8,w4a6,w4a4 \\
      --methods=baseline,brecq,brecq_sas,brecq_resample,full --out=RESULTS.md \\
      --workdir=runs/ablate [--checkpoint research] [--config.recon.iters=1000 ...]

  python -m experiments.ablate --merge=parts/a.json,parts/b.json --out=RESULTS.md   # one table from parts
      [--fp_sets]      # parts of another kind of GPU (FP rows beyond the tolerance): an FP set each, compared within

Without --checkpoint the embedded default model is used. --config.<field>=value overrides go to every PTQ config
(checked against each preset's fields); the evaluation settings of every row are --eval.<field>=value
(configs/eval.py: num_images — 1,000 per seed by default —, cfg, top_k, top_p, num_real). The protocol
(`varq_jax.runs.protocol`): every row on the same keys over --seeds, the FP model again over --noise_seeds (the
noise floor), --replicates paired bootstrap replicates, one calibration set per --calib_seeds (+ --extra_calib)
made in --calib_dtype and shared by the rows of that seed. Runs whose outputs exist in --workdir are skipped;
stopped ones resume. SIGTERM (e.g. `timeout -k 60 S`) stops the invocation at the run it arrives in and writes the
table of the runs finished before it (exit status 143), so that the end of a device lease does not lose them.
The metrics are the in-project classifier's (class accuracy, Fréchet distances of its features), not FID.
"""
import os
import shlex
import signal
import sys

from absl import flags
from ml_collections import config_flags

from varq_jax import cli

FLAGS = flags.FLAGS
EVAL_SETTINGS = os.path.join(cli.CONFIG_DIR, "eval.py") + ":ablate"   # 1,000 images per seed
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
flags.DEFINE_enum("execution", "simulate", ["simulate", "int"], "the quantized rows: simulate (fake quant) or int "
                  "(integer codes and GEMMs); a table holds one execution")
flags.DEFINE_integer("per_device_batch", 16, "images per device per generation step")
flags.DEFINE_integer("feature_batch", 32, "images per device per step of feature extraction")
flags.DEFINE_string("classifier", None, "exported shapes classifier (default: the embedded one)")
flags.DEFINE_integer("diag_samples", 8, "calibration samples of the A·V error diagnostic (0: skip it)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "protocol: sampling seeds of every row (--eval.num_images images each)")
flags.DEFINE_list("noise_seeds", ["3", "4", "5"], "protocol: the FP model again with these seeds, the noise-floor row "
                  "(empty: none)")
flags.DEFINE_integer("replicates", 2000, "protocol: paired bootstrap replicates (0: no intervals)")
flags.DEFINE_list("calib_seeds", ["2025"], "protocol: calibration seeds of every preset (one shared set each)")
flags.DEFINE_list("extra_calib", ["w4a4:2026"], "protocol: more calibration seeds for some presets, PRESET:SEED[+SEED]")
flags.DEFINE_enum("calib_dtype", "float32", ["float32", "bfloat16", "auto"], "protocol: dtype of the shared "
                  "calibration sets' sampler (float32: HIGHEST matmul precision, as the official)")
flags.DEFINE_list("zero_shot", [], "zero-shot rows (inpaint, outpaint, edit) for the FP model and these runs, e.g. "
                  "w4a6_baseline,w4a6_full (runs of this table; none: no zero-shot section)")
flags.DEFINE_list("runs", [], "run only these runs of --presets × --methods (names as in the table, e.g. "
                  "w4a4_baseline_c2026): a part of a table joined later with --merge")
flags.DEFINE_list("calibration", [], "calibration sets of earlier invocations to share instead of sampling them "
                  "again (a quantize workdir, its state/ or state/calibration), one per calibration seed")
flags.DEFINE_list("planned_also", [], "with --merge: runs the table plans beyond --presets × --methods (e.g. "
                  "w4a4_litevar,w4a4_full_litevar), listed as not run where no part holds them; --zero_shot then "
                  "names the planned zero-shot rows")
flags.DEFINE_integer("zero_shot_images", 1000, "protocol: real test images the zero-shot rows regenerate")
flags.DEFINE_bool("fp_sets", False, "with --merge: parts whose FP rows differ beyond the tolerance (another kind of "
                  "GPU) form FP sets of their own, each with its FP rows, compared only within it (else refused)")
flags.DEFINE_list("merge", None, "instead of running: merge these ablation JSONs (separate invocations, e.g. one per "
                  "GPU or per device session) into --out; the A·V diagnostic is recomputed on --checkpoint; the runs "
                  "of --presets × --methods (and --extra_calib) that no part holds are listed as not run")

_OVERRIDES = []


def main(argv):
    del argv
    cli.quiet_logs()
    from varq_jax.eval.evaluate import EvalConfig
    from varq_jax.runs import ablation, results_table, stopping
    e = FLAGS.eval
    config = EvalConfig(num_images=e.num_images, num_per_class=e.num_per_class, seed=e.seed, cfg=e.cfg,
                        top_k=e.top_k, top_p=e.top_p, num_real=e.num_real, dtype=FLAGS.dtype,
                        per_device_batch=FLAGS.per_device_batch, feature_batch=FLAGS.feature_batch,
                        classifier=FLAGS.classifier, execution=FLAGS.execution)
    command = "python -m experiments.ablate " + " ".join(shlex.quote(a) for a in COMMAND_ARGS)
    if FLAGS.merge:
        result = _merge(command)
    else:
        if e.num_images <= 0:
            raise ValueError(f"eval.num_images (images per seed) must be positive, got {e.num_images}")
        plan = cli.ablation_plan(FLAGS.presets, FLAGS.methods, cli.parse_override_args(_OVERRIDES))
        try:
            result = ablation.run_ablation(plan, config, FLAGS.workdir, FLAGS.out, checkpoint=FLAGS.checkpoint,
                                           diag_samples=FLAGS.diag_samples, command=command, protocol=_protocol(e),
                                           zero_shot=FLAGS.zero_shot, calibration=FLAGS.calibration,
                                           only=FLAGS.runs, stop_on=(signal.SIGTERM,))
        except stopping.Stopped as stop:
            print(f"error: stopped by {stop}", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
    print("\n".join(results_table.table(result["rows"])))
    if result.get("stopped"):
        print(f"stopped by {result['stopped']}: the table holds the runs finished before it; not run: "
              f"{', '.join(result['not_run']) or 'none'} (the same command again resumes them)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


def _protocol(e):
    from varq_jax.runs.protocol import Protocol
    def ints(name, values):
        try:
            return tuple(int(v) for v in values)
        except ValueError:
            raise ValueError(f"{name} takes integers, got {','.join(values)!r}") from None
    extra = []
    for item in FLAGS.extra_calib:
        preset, sep, seeds = item.partition(":")
        if not sep or not seeds:
            raise ValueError(f"--extra_calib takes PRESET:SEED[+SEED], got {item!r}")
        extra.append((preset, ints("--extra_calib", seeds.split("+"))))
    unknown = [p for p, _ in extra if p not in FLAGS.presets]
    if unknown:
        raise ValueError(f"--extra_calib names preset {unknown[0]!r}, which is not in --presets")
    return Protocol(seeds=ints("--seeds", FLAGS.seeds), images_per_seed=e.num_images,
                    noise_seeds=ints("--noise_seeds", FLAGS.noise_seeds), replicates=FLAGS.replicates,
                    calib_seeds=ints("--calib_seeds", FLAGS.calib_seeds), extra_calib=tuple(extra),
                    calib_dtype=FLAGS.calib_dtype, zero_shot_images=FLAGS.zero_shot_images)


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
    from varq_jax.runs import protocol
    values = [protocol.load_values(protocol.values_path(path)) for path in FLAGS.merge]
    ck = default_model.load_model(FLAGS.checkpoint) if FLAGS.diag_samples > 0 else None
    proto = _protocol(FLAGS.eval)
    planned = [r.name for r in ablation.protocol_runs(cli.ablation_plan(FLAGS.presets, FLAGS.methods), proto)]
    if FLAGS.planned_also:
        known = [r.name for r in ablation.protocol_runs(cli.ablation_plan(FLAGS.presets, cli.METHODS), proto)]
        unknown = [n for n in FLAGS.planned_also if n not in known]
        if unknown:
            raise ValueError(f"--planned_also: {unknown[0]!r} is not a run of --presets × the known methods")
        planned += [n for n in FLAGS.planned_also if n not in planned]
    result = ablation.merge(parts, values=values, ck=ck, workdir=FLAGS.workdir, diag_samples=FLAGS.diag_samples,
                            command=command, method_order=cli.METHODS, make_plan=cli.ablation_plan,
                            planned=planned, planned_zero_shot=FLAGS.zero_shot, fp_sets=FLAGS.fp_sets)
    results_table.write(FLAGS.out, result)
    print(f"wrote {FLAGS.out} and {FLAGS.out[:-3]}.json")
    return result


if __name__ == "__main__":
    cli.configure_xla()
    _OVERRIDES[:] = [a for a in sys.argv[1:] if a.startswith("--config.")]
    sys.argv = [a for a in sys.argv if not a.startswith("--config.")]
    cli.run(main)
