"""Sampling throughput of random-weight VAR presets (FP and W4A6 shift-and-sum), the θ search time, sharded
evaluation throughput over 1..N devices, and random-weight checkpoints for timing whole pipelines.

  python -m experiments.benchmark --presets d16,d30 --batches 8,64 --quant_presets d16 --out bench.json
  python -m experiments.benchmark --presets "" --quant_presets "" --eval_presets d16 --eval_devices 1,2
  python -m experiments.benchmark --presets "" --quant_presets "" --save_random d16:runs/d16_random

Compile time is measured separately (lower + compile) and excluded from the steady-state timings.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from varq_jax import benchmarking, cli, sampling
from varq_jax.files import atomic_write
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
flags.DEFINE_string("eval_presets", "", "presets for sharded generation throughput at the evaluation settings")
flags.DEFINE_string("eval_devices", "1", "device counts for the sharded generation and feature throughput")
flags.DEFINE_integer("eval_batch", 64, "images per device per generation step")
flags.DEFINE_integer("eval_steps", 4, "timed generation steps per device count (after a warm-up step)")
flags.DEFINE_float("eval_theta", 0.0036, "θ of the W4A6 evaluation rows (the 10k-grid search result for random "
                   "d16; throughput barely depends on it)")
flags.DEFINE_integer("feature_batch", 200, "images per device per Inception step (0: skip the feature rows)")
flags.DEFINE_string("int_rows", "", "PRESET:CONFIG[:EXECUTION] rows timed side by side: CONFIG fp (bf16), w8a8, w6a6, "
                    "w4a8, w4a6, w4a4, with 'sas' appended for shift-and-sum (θ = --eval_theta); EXECUTION int "
                    "(default) or simulate; e.g. d30:fp,d30:w8a8,d16:fp,d16:w4a6sas,d16:w4a6sas:simulate")
flags.DEFINE_string("int_kernel", "auto", "integer GEMM of the int rows: auto | xla | pallas | dequant (weight "
                    "codes dequantized in the call, a 16-bit GEMM on fake-quantized inputs: the simulation's "
                    "arithmetic)")
flags.DEFINE_string("int_act_kernel", "auto", "activation codes of the int rows: xla | pallas (one-pass "
                    "kernel) | auto (pallas on GPU)")
flags.DEFINE_string("int_attn_kernel", "xla", "quantized attention of the int rows: xla | pallas (attn_kernel.py: "
                    "the scores never written)")
flags.DEFINE_bool("breakdown", True, "profile one call of each int row: time per part (Linears, attention, "
                  "quantization passes, rest)")
flags.DEFINE_string("save_random", "", "PRESET:DIR writes a random-weight checkpoint of a preset (e.g. to time "
                    "`experiments.quantize` on d16)")


def _model(preset: str):
    vae_cfg, var_cfg = zoo.preset(preset)
    params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
    return vae_cfg, var_cfg, params


def _settings(var_cfg):
    return sampling.SamplingConfig(1.5, min(900, var_cfg.vocab_size), 0.96)


def _save(rows):
    if FLAGS.out:
        atomic_write(FLAGS.out, json.dumps({"device": benchmarking.device_name(), "rows": rows}, indent=1))


def _time_sampler(what, sampler, params, quant, batches, repeats, rows):
    for b in batches:
        labels = jnp.arange(b, dtype=jnp.int32) % sampler.var_cfg.num_classes
        args = (params, quant, labels, jax.random.split(jax.random.PRNGKey(1), b))
        compiled, ct = benchmarking.compile_timed(sampler._generate, *args)
        t = benchmarking.median_time(compiled, *args, repeats=repeats)
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
    means, counts, bits = theta_lib.attention_statistics(vae_cfg, var_cfg, params, quant, policy, np.array([0]),
                                                   calibration.per_image_keys(0, [0]), _settings(var_cfg),
                                                   jnp.bfloat16)
    jax.block_until_ready(means)
    stats_s = time.perf_counter() - t
    total = bops.total_bops(var_cfg, policy)
    search = lambda: bops.search_theta(means, counts, total, bits, var_cfg.head_dim, 0.01, FLAGS.n_grids)
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


def _int_policy(config: str):
    """w8a8 / w4a6sas … → the policy (None for fp) and θ."""
    if config == "fp":
        return None, None
    sas = config.endswith("sas")
    w, a = config.removesuffix("sas").removeprefix("w").split("a")
    return QuantPolicy(w_bits=int(w), a_bits=int(a), shift_and_sum=sas), (FLAGS.eval_theta if sas else 1.0)


def bench_int_row(spec: str, batches, repeats, rows):
    """One row of the integer-execution table: whole-call time (compile apart), model and peak call bytes, the
    time per part from a profile."""
    from varq_jax.quant import execution
    preset, config, mode = (spec.split(":") + ["int"])[:3]
    vae_cfg, var_cfg, params = _model(preset)
    policy, theta = _int_policy(config)
    quant = None
    if policy is None:
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        mode = "bf16"
        sampler = sampling.Sampler(vae_cfg, var_cfg, _settings(var_cfg), dtype=jnp.bfloat16,
                                   scan_blocks=FLAGS.scan_blocks)
    else:
        quant = state.set_theta(jax.jit(state.init_quant_state, static_argnums=1)(params["var"], policy), theta)
        if mode == "int":
            policy = execution.IntegerPolicy.of(policy, kernel=FLAGS.int_kernel, act_kernel=FLAGS.int_act_kernel,
                                                attn_kernel=FLAGS.int_attn_kernel)
        sampler = sampling.Sampler(vae_cfg, var_cfg, _settings(var_cfg), dtype=jnp.bfloat16, policy=policy,
                                   scan_blocks=FLAGS.scan_blocks, execution="int" if mode == "int" else "simulate")
        params, quant = sampler.prepare(params, quant)
        jax.block_until_ready(quant)
    model_bytes = int(sum(a.nbytes for a in jax.tree.leaves((params["var"], quant))))
    coded = None
    if mode == "int":
        coded = execution.model_bytes(params["var"], quant)["coded_linears"]
    blocks = "scanned" if FLAGS.scan_blocks else "unrolled"
    for b in batches:
        labels = jnp.arange(b, dtype=jnp.int32) % var_cfg.num_classes
        args = (params, quant, labels, jax.random.split(jax.random.PRNGKey(1), b), None, None)
        compiled, ct = benchmarking.compile_timed(sampler._generate, *args)
        t = benchmarking.median_time(compiled, *args, repeats=repeats)
        mem = compiled.memory_analysis()
        peak = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        row = {"what": f"{preset} {config} {mode} {blocks}", "preset": preset, "config": config, "execution": mode,
               "blocks": blocks, "batch": b, "compile_s": ct, "s": t, "img_per_s": b / t,
               "model_bytes": model_bytes, "coded_linear_bytes": coded, "call_peak_bytes": peak,
               "gemm": getattr(policy, "kernel", None),
               "act_kernel": policy.act_codes_kernel() if hasattr(policy, "act_codes_kernel") else None,
               "attn_kernel": getattr(policy, "attn_kernel", None),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
        if FLAGS.breakdown and jax.default_backend() == "gpu":   # kernels map to scopes only without command
            # buffers: run the breakdown with XLA_FLAGS=--xla_gpu_enable_command_buffer= (recorded in the row)
            try:
                row["breakdown_s"] = benchmarking.time_breakdown(compiled, *args)
            except Exception as e:          # a profile is a diagnostic: its failure must not lose the row
                row["breakdown_s"] = f"failed: {type(e).__name__}: {e}"
        rows.append(row)
        print(f"{row['what']:<36} B={b:<4} compile {ct:6.1f} s  {t * 1e3:8.1f} ms  {b / t:7.1f} img/s  "
              f"model {model_bytes / 2**20:8.1f} MiB  peak {0 if peak is None else peak / 2**30:6.2f} GiB  "
              f"{row.get('breakdown_s', '')}", flush=True)
        _save(rows)


def _eval_row(rows, what, n_dev, per_step, seconds, **extra):
    rate = per_step / seconds
    rows.append({"what": what, "devices": n_dev, "images_per_step": per_step, "s_per_step": seconds,
                 "img_per_s": rate, "projected_50k_s": 50_000 / rate, **extra})
    print(f"{what:<44} devices {n_dev}  {per_step:5d} img/step  {seconds * 1e3:8.1f} ms/step  {rate:8.1f} img/s  "
          f"50k images: {50_000 / rate / 60:6.1f} min", flush=True)
    _save(rows)


def bench_eval(preset, device_counts, rows):
    """The sharded generation program of `experiments.evaluate` (uint8 images out, batch split over 'data')."""
    from varq_jax import parallel
    from varq_jax.eval import generate
    vae_cfg, var_cfg, params = _model(preset)
    settings = _settings(var_cfg)
    policy = QuantPolicy(w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits, shift_and_sum=True)
    quant = state.set_theta(jax.jit(state.init_quant_state, static_argnums=1)(params["var"], policy),
                            FLAGS.eval_theta)
    for name, pol, q in (("FP", None, None), (f"W{policy.w_bits}A{policy.a_bits} SAS", policy, quant)):
        for n_dev in device_counts:
            mesh = parallel.make_mesh(devices=jax.devices()[:n_dev])
            spec = generate.params_spec(params)
            gen = generate.compiled_generator(vae_cfg, var_cfg, settings, jnp.bfloat16, pol, mesh, spec,
                                              scan_blocks=FLAGS.scan_blocks)
            placed = parallel.put_tree(params, parallel.param_shardings(params, mesh))
            rep = parallel.replicated(mesh)
            q_placed = parallel.put_tree(q, rep) if q is not None else None
            per_step = FLAGS.eval_batch * n_dev
            data = parallel.batch_sharding(mesh)
            seed = parallel.put_global(np.asarray(0, np.uint32), rep)

            def step(i):
                idx = np.arange(i * per_step, (i + 1) * per_step, dtype=np.int32)
                labels = parallel.put_global(idx % var_cfg.num_classes, data)
                return gen(placed, q_placed, seed, labels, parallel.put_global(idx, data), None, None)
            t = time.perf_counter()
            jax.block_until_ready(step(0))
            first = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(1, FLAGS.eval_steps + 1):
                out = step(i)
            jax.block_until_ready(out)
            unrolled = "" if FLAGS.scan_blocks else " unrolled"
            _eval_row(rows, f"sharded generation {preset} {name} bf16{unrolled}", n_dev, per_step,
                      (time.perf_counter() - t) / FLAGS.eval_steps, first_step_incl_compile_s=first)


def bench_features(device_counts, rows):
    """InceptionV3 (FID network, random weights: throughput only) on 256² uint8 images, data-parallel."""
    from varq_jax import parallel
    from varq_jax.eval import evaluate, inception
    net = evaluate.FeatureNet("inception", evaluate._inception_apply,
                              jax.jit(inception.init_variables)(jax.random.PRNGKey(0)), None, "random")
    for n_dev in device_counts:
        mesh = parallel.make_mesh(devices=jax.devices()[:n_dev])
        per_step = FLAGS.feature_batch * n_dev
        images = np.random.RandomState(0).randint(0, 256, (per_step, 256, 256, 3), np.uint8)
        run = lambda k: evaluate.extract_features(net, [images] * k, mesh, FLAGS.feature_batch)
        jax.block_until_ready(run(1))
        t = time.perf_counter()
        run(FLAGS.eval_steps)
        _eval_row(rows, "Inception features (pool/spatial/logits)", n_dev, per_step,
                  (time.perf_counter() - t) / FLAGS.eval_steps)


def save_random(spec: str):
    from varq_jax import checkpoint
    preset, path = spec.split(":", 1)
    vae_cfg, var_cfg, params = _model(preset)
    checkpoint.save(path, vae_cfg, var_cfg, params,
                    meta={"random_weights": True, "description": f"RANDOM-WEIGHT {preset} (benchmarks only)"})
    print(f"wrote random-weight {preset} to {path}", flush=True)


def main(argv):
    del argv
    cli.quiet_logs()
    print(benchmarking.device_name(), flush=True)
    if FLAGS.save_random:
        save_random(FLAGS.save_random)
    batches = [int(b) for b in FLAGS.batches.split(",")]
    rows = []
    for p in filter(None, FLAGS.presets.split(",")):
        bench_fp(p, batches, FLAGS.repeats, rows)
    for p in filter(None, FLAGS.quant_presets.split(",")):
        bench_quant(p, batches, FLAGS.repeats, rows)
    for spec in filter(None, FLAGS.int_rows.split(",")):
        try:
            bench_int_row(spec, batches, FLAGS.repeats, rows)
        except Exception as e:               # one failing row must not lose the others of the lease
            rows.append({"what": spec, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
            print(f"{spec}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
            _save(rows)
    device_counts = [int(n) for n in FLAGS.eval_devices.split(",")]
    for p in filter(None, FLAGS.eval_presets.split(",")):
        bench_eval(p, device_counts, rows)
    if FLAGS.eval_presets and FLAGS.feature_batch:
        bench_features(device_counts, rows)
    _save(rows)


if __name__ == "__main__":
    cli.configure_xla()
    app.run(main)
