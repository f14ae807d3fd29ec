"""Evaluates checkpoints: sharded, resumable generation over every device, then FID & co. or in-project metrics.

  python -m experiments.evaluate --out=runs/eval/fp [--config.num_images=1000]       # the embedded default model
  python -m experiments.evaluate --checkpoint=ckpt/d16_w4a6 --out=runs/eval/w4a6 \\
      --inception=weights/inception --ref_batch=VIRTUAL_imagenet256_labeled.npz --ref_samples=runs/eval/fp/samples.npz
  python -m experiments.evaluate --checkpoints=ckpt/d16_fp,ckpt/d16_w8a8,ckpt/d16_w4a6 --fid_to_first --out=runs/sweep
  python -m experiments.evaluate --zero_shot=inputs.npz --tasks=inpaint,outpaint --out=runs/eval/zs

Rerunning a stopped command resumes from its finished shards. Several processes (SLURM, Open MPI, a TPU pod, or
JAX_COORDINATOR_ADDRESS) are detected and joined with jax.distributed.initialize(); --out must then be on a
filesystem every host sees. Settings go through --config (configs/eval.py; --config.FIELD=VALUE: num_images,
num_per_class, seed, cfg, top_k, top_p, num_real, grid_images, shard_size, tasks, box, edit_class); paths and
execution choices are flags.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from varq_jax import cli

FLAGS = flags.FLAGS
SETTINGS = os.path.join(cli.CONFIG_DIR, "eval.py")
RENAMED = ("num_images", "num_per_class", "seed", "cfg", "top_k", "top_p", "num_real", "grid_images", "shard_size",
           "tasks", "box", "edit_class")
if __name__ == "__main__":          # before the config flag reads its --config.* overrides
    cli.refuse_renamed(sys.argv, RENAMED)
    sys.argv = cli.rewrite_config_argv(sys.argv, default=SETTINGS)
config_flags.DEFINE_config_file("config", SETTINGS, "evaluation settings (configs/eval.py)", lock_config=True)
flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: the embedded default model)")
flags.DEFINE_list("checkpoints", None, "sweep: comma-separated checkpoint directories ('default' = embedded model)")
flags.DEFINE_bool("fid_to_first", False, "sweep: score every checkpoint against the first one's samples "
                                         "(put the FP model first for FID to FP)")
flags.DEFINE_string("out", "eval", "output directory (samples, shards, results.json; sweep.md for sweeps)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype of the transformer")
flags.DEFINE_enum("execution", "simulate", ["simulate", "int"], "a quantized checkpoint: simulate (fake quant) or "
                  "int (integer weight codes and GEMMs)")
flags.DEFINE_integer("per_device_batch", 16, "images per device per step (a multiple of --shard_size)")
flags.DEFINE_integer("feature_batch", 32, "images per device per step of feature extraction")
flags.DEFINE_integer("model_parallel", 1, "devices of the 'model' mesh axis (VAR kernels split over them)")
flags.DEFINE_bool("scan_blocks", True, "scan the VAR blocks (fast compile) or unroll them (faster generation on GPU, "
                  "about twice the compile time)")
flags.DEFINE_string("inception", None, "converted FID Inception checkpoint (python -m varq_jax.eval.convert_inception)")
flags.DEFINE_string("ref_batch", None, "ADM reference batch npz (statistics used when present); needs --inception")
flags.DEFINE_string("ref_samples", None, "another sample set (ADM npz, e.g. the FP model's samples.npz)")
flags.DEFINE_string("classifier", None, "exported shapes classifier (default: the embedded one, if shipped)")
flags.DEFINE_string("zero_shot", None, "npz of uint8 input images (arr_0; optional boxes, labels, target_labels)")
flags.DEFINE_list("xla_options", [], "XLA compiler options for generation, name=value (e.g. "
                  "xla_backend_optimization_level=0: CPU smoke runs compile ~2x faster)")
flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"], "jax.distributed.initialize(): auto-detect, force, never")
flags.DEFINE_string("coordinator_address", None, "multi-host: coordinator host:port (else from the environment)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes (else from the environment)")
flags.DEFINE_integer("process_id", None, "multi-host: this process's id (else from the environment)")


def _xla_options() -> tuple:
    out = []
    for item in FLAGS.xla_options:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--xla_options entries must be name=value, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out.append((name, low == "true"))
        else:
            out.append((name, int(value) if value.lstrip("-").isdigit() else value))
    return tuple(sorted(out))


def eval_config():
    from varq_jax.eval.evaluate import EvalConfig
    c = FLAGS.config
    try:
        box = tuple(float(v) for v in c.box)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4:
        raise ValueError(f"config.box must be four numbers y0,x0,y1,x1, got {c.box!r}")
    return EvalConfig(num_images=c.num_images, num_per_class=c.num_per_class, seed=c.seed, cfg=c.cfg,
                      top_k=c.top_k, top_p=c.top_p, dtype=FLAGS.dtype, per_device_batch=FLAGS.per_device_batch,
                      shard_size=c.shard_size, feature_batch=FLAGS.feature_batch,
                      model_parallel=FLAGS.model_parallel, grid_images=c.grid_images, inception=FLAGS.inception,
                      ref_batch=FLAGS.ref_batch, ref_samples=FLAGS.ref_samples, classifier=FLAGS.classifier,
                      num_real=c.num_real, zero_shot=FLAGS.zero_shot, tasks=tuple(c.tasks), box=box,
                      edit_class=c.edit_class, compiler_options=_xla_options(), scan_blocks=FLAGS.scan_blocks,
                      execution=FLAGS.execution)


def main(argv):
    del argv
    from varq_jax import parallel       # before anything touches a device: multi-host start-up comes first
    parallel.initialize_distributed(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    run()


def run():
    from varq_jax import parallel
    from varq_jax.eval import evaluate as ev
    from varq_jax.eval import sweep as sweep_lib
    if FLAGS.checkpoint and FLAGS.checkpoints:
        raise ValueError("give --checkpoint or --checkpoints, not both")
    config = eval_config()
    say = print if parallel.is_main_process() else (lambda *a: None)
    if FLAGS.checkpoints:
        ckpts = [None if c == "default" else c for c in FLAGS.checkpoints]
        rows = sweep_lib.sweep(ckpts, FLAGS.out, config, fid_to_first=FLAGS.fid_to_first, log=say)
        say(sweep_lib.sweep_markdown(rows))
        say(f"wrote {os.path.join(FLAGS.out, 'sweep.md')} and sweep.json")
        return
    if FLAGS.fid_to_first:
        raise ValueError("--fid_to_first needs --checkpoints")
    results = ev.evaluate(FLAGS.checkpoint, FLAGS.out, config, log=say)
    for line in ev.metric_lines(results):
        say(line)
    say(f"samples: {results['samples']['path']}  grid: {results['samples']['grid']}  "
        f"results: {os.path.join(FLAGS.out, ev.RESULTS)}")


if __name__ == "__main__":
    cli.configure_xla()
    cli.run(main)
