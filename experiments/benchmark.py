"""Sampling throughput of random-weight VAR presets (FP and W4A6 shift-and-sum) and the θ search time.

  python -m experiments.benchmark --presets d16,d30 --batches 8,64 --quant_presets d16 --out bench.json

Compile time is measured separately (lower + compile) and excluded from the steady-state timings.
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from varq_jax import benchmarking, sampling
from varq_jax.models import zoo
from varq_jax.models.build import init_params
from varq_jax.quant import bops, calibration, state, theta as theta_lib
from varq_jax.quant.policy import QuantPolicy

FLAGS = flags.FLAGS
flags.DEFINE_string("presets", "d16,d30", "model presets for FP sampling (random weights)")
flags.DEFINE_string("quant_presets", "d16", "model presets for W4A6 shift-and-sum sampling")
flags.DEFINE_string("batches", "8,64", "batch sizes")
flags.DEFINE_integer("w_bits", 4, "weight bits of the quantized runs")
flags.DEFINE_integer("a_bits", 6, "activation bits of the quantized runs")
flags.DEFINE_integer("n_grids", 10_000, "θ search grid")
flags.DEFINE_integer("repeats", 5, "timed repetitions (median reported)")
flags.DEFINE_string("out", None, "JSON output file")
flags.DEFINE_bool("scan_blocks", True, "scan the VAR blocks (fast compile) or unroll them")


def _model(preset: str):
    vae_cfg, var_cfg = zoo.preset(preset)
    params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
    return vae_cfg, var_cfg, params


def _settings(var_cfg):
    return sampling.SamplingConfig(1.5, min(900, var_cfg.vocab_size), 0.96)


def _save(rows):
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"device": benchmarking.device_name(), "rows": rows}, f, indent=1)


def _time_sampler(what, sampler, params, quant, batches, repeats, rows):
    for b in batches:
        labels = jnp.arange(b, dtype=jnp.int32) % sampler.var_cfg.num_classes
        args = (params, quant, labels, jax.random.split(jax.random.PRNGKey(1), b))
        ct = benchmarking.compile_time(sampler._generate, *args)
        t = benchmarking.median_time(sampler._generate, *args, repeats=repeats)
        rows.append({"what": what, "batch": b, "compile_s": ct, "s": t, "img_per_s": b / t})
        print(f"{what:<40} B={b:<4} compile {ct:7.1f} s   {t * 1e3:8.1f} ms   {b / t:8.1f} img/s", flush=True)
        _save(rows)


def bench_fp(preset, batches, repeats, rows):
    vae_cfg, var_cfg, params = _model(preset)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    sampler = sampling.Sampler(vae_cfg, var_cfg, _settings(var_cfg), dtype=jnp.bfloat16, scan_blocks=FLAGS.scan_blocks)
    what = f"FP sampling {preset} bf16" + ("" if FLAGS.scan_blocks else " unrolled")
    _time_sampler(what, sampler, params, None, batches, repeats, rows)


def bench_quant(preset, batches, repeats, rows):
    vae_cfg, var_cfg, params = _model(preset)
    policy = QuantPolicy(w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits, shift_and_sum=True)
    quant = jax.jit(state.init_quant_state, static_argnums=1)(params["var"], policy)
    # θ from one calibration sample's quantized sampling pass (as the official), timing the search itself.
    t = time.perf_counter()
    means, counts = theta_lib.attention_statistics(vae_cfg, var_cfg, params, quant, policy, np.array([0]),
                                                   calibration.per_image_keys(0, [0]), _settings(var_cfg),
                                                   jnp.bfloat16)
    jax.block_until_ready(means)
    stats_s = time.perf_counter() - t
    total = bops.total_bops(var_cfg, policy.w_bits, policy.a_bits)
    search = lambda: bops.search_theta(means, counts, total, policy.a_bits, var_cfg.head_dim, 0.01, FLAGS.n_grids)
    t = time.perf_counter()
    theta = search()
    first = time.perf_counter() - t
    warm = benchmarking.median_time(search, repeats=repeats, warmup=0)
    rows.append({"what": f"theta search {preset} W{policy.w_bits}A{policy.a_bits} grid {FLAGS.n_grids}",
                 "first_call_s": first, "s": warm, "stats_pass_s": stats_s, "theta": theta})
    print(f"θ search ({FLAGS.n_grids} grid): first call {first:.3f} s, warm {warm * 1e3:.1f} ms, θ = {theta:.5g} "
          f"(statistics pass incl. compile {stats_s:.1f} s)", flush=True)
    quant = state.set_theta(quant, theta)
    sampler = sampling.Sampler(vae_cfg, var_cfg, _settings(var_cfg), dtype=jnp.bfloat16, policy=policy,
                               scan_blocks=FLAGS.scan_blocks)
    _time_sampler(f"W{policy.w_bits}A{policy.a_bits} SAS sampling {preset} bf16", sampler, params, quant, batches,
                  repeats, rows)


def main(argv):
    del argv
    print(benchmarking.device_name(), flush=True)
    batches = [int(b) for b in FLAGS.batches.split(",")]
    rows = []
    for p in filter(None, FLAGS.presets.split(",")):
        bench_fp(p, batches, FLAGS.repeats, rows)
    for p in filter(None, FLAGS.quant_presets.split(",")):
        bench_quant(p, batches, FLAGS.repeats, rows)
    _save(rows)


if __name__ == "__main__":
    app.run(main)
