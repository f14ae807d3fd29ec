"""Sampling throughput of random-weight VAR presets: compile time and images/s per batch size.

  python -m experiments.benchmark --presets d16,d30 --batches 8,64 --out bench.json
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from varq_jax import benchmarking, sampling
from varq_jax.models import zoo
from varq_jax.models.build import init_params

FLAGS = flags.FLAGS
flags.DEFINE_string("presets", "d16,d30", "model presets (random weights)")
flags.DEFINE_string("batches", "8,64", "batch sizes")
flags.DEFINE_integer("repeats", 5, "timed repetitions (median reported)")
flags.DEFINE_string("out", None, "JSON output file")


def bench_fp(preset: str, batches, repeats: int) -> list:
    vae_cfg, var_cfg = zoo.preset(preset)
    params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    sampler = sampling.Sampler(vae_cfg, var_cfg, sampling.SamplingConfig(1.5, min(900, var_cfg.vocab_size), 0.96),
                               dtype=jnp.bfloat16)
    rows = []
    for b in batches:
        labels = jnp.arange(b, dtype=jnp.int32) % var_cfg.num_classes
        keys = jax.random.split(jax.random.PRNGKey(1), b)
        args = (params, None, labels, keys)
        ct = benchmarking.compile_time(sampler._generate, *args)
        t = benchmarking.median_time(sampler._generate, *args, repeats=repeats)
        rows.append({"what": f"FP sampling {preset}", "batch": b, "compile_s": ct, "s": t, "img_per_s": b / t})
        print(f"{preset:>5} B={b:<4} compile {ct:7.1f} s   {t * 1e3:8.1f} ms   {b / t:8.1f} img/s", flush=True)
    return rows


def main(argv):
    del argv
    print(benchmarking.device_name())
    batches = [int(b) for b in FLAGS.batches.split(",")]
    rows = [r for p in FLAGS.presets.split(",") for r in bench_fp(p, batches, FLAGS.repeats)]
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"device": benchmarking.device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
