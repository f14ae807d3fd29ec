"""Per-iteration time of one d16 attention unit and one FFN unit (the AdaRound loop) and one float32 θ-statistics
pass, with float32 matmuls at HIGHEST precision (the pipeline's default, `matmul_precision="highest"`) and at JAX's
default (TF32 on GPUs), on random d16 weights. Prints a table and writes JSON to OUT.

  python benchmarks/precision/bench_precision.py OUT_DIR [preset] [iters] [highest,high,default]
"""
import dataclasses
import json
import os
import sys
import time

from varq_jax import cli

cli.configure_xla()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from varq_jax import sampling  # noqa: E402
from varq_jax.models import zoo  # noqa: E402
from varq_jax.models.build import init_params  # noqa: E402
from varq_jax.quant import calibration, capture as cap, pipeline, reconstruction as rec, state  # noqa: E402
from varq_jax.quant import theta as theta_lib  # noqa: E402
from varq_jax.quant.policy import QuantPolicy  # noqa: E402

out = sys.argv[1]
preset = sys.argv[2] if len(sys.argv) > 2 else "d16"
ITERS = int(sys.argv[3]) if len(sys.argv) > 3 else 500
N = 32                                     # calibration rows captured per unit (each iteration draws 4)
res = {"preset": preset, "iters": ITERS, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def save():
    os.makedirs(out, exist_ok=True)
    json.dump(res, open(os.path.join(out, f"precision_{preset}.json"), "w"), indent=1)


vae_cfg, var_cfg = zoo.preset(preset)
params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
policy = QuantPolicy(w_bits=4, a_bits=6, phase="hard")
quant = state.set_theta(state.init_quant_state(params["var"], policy), 0.0036)
rng = np.random.default_rng(0)
labels = rng.integers(0, var_cfg.num_classes, N).astype(np.int32)
tokens = [rng.integers(0, var_cfg.vocab_size, (N, pn * pn)).astype(np.int32) for pn in var_cfg.patch_nums]
rc = dataclasses.replace(rec.ReconConfig(), iters=ITERS).optimisation_only()
PRECISIONS = sys.argv[4].split(",") if len(sys.argv) > 4 else ["highest", "default"]
settings = {p: pipeline.PTQSettings(matmul_precision=p) for p in PRECISIONS}

# Relative error of one float32 matmul at fc1's shape (2·680 tokens × 1024 → 4096) against float64.
a = rng.standard_normal((1360, var_cfg.width)).astype(np.float32)
w = (rng.standard_normal((var_cfg.width, var_cfg.hidden)) / np.sqrt(var_cfg.width)).astype(np.float32)
exact = a.astype(np.float64) @ w.astype(np.float64)
for prec in PRECISIONS:
    with jax.default_matmul_precision(None if prec == "default" else prec):
        got = np.asarray(jax.jit(jnp.dot)(a, w), np.float64)
    res[f"matmul rel error {prec}"] = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    print("matmul rel error", prec, res[f"matmul rel error {prec}"], flush=True)

for name in ("blocks_0/attn", "blocks_0/ffn"):
    tgt = cap.target_by_name(var_cfg, name)
    data = cap.capture(vae_cfg, var_cfg, params, labels, tokens, tgt)
    mp, mq = cap.subtree(params["var"], tgt.path), cap.subtree(quant, tgt.path)
    soft = cap.standalone_policy(policy, tgt, mp, phase="soft")
    a0 = rec.init_module_alpha(mp, mq, cap.trainable_linears(policy, tgt, mp))
    segs = cap.segments(var_cfg, tgt)
    for prec, s in settings.items():
        with pipeline.precision_scope(s, jnp.float32):
            run = lambda k: jax.block_until_ready(rec.optimize_alpha(tgt.spec, var_cfg, soft, rc, segs, mp, mq, a0,
                                                                     data.inputs, data.outputs, jax.random.PRNGKey(k)))
            t = time.perf_counter(); run(1); first = time.perf_counter() - t
            times = []
            for k in range(3):
                t = time.perf_counter(); run(2 + k); times.append(time.perf_counter() - t)
        res[f"{name} {prec}"] = {"first_s": first, "per_iter_ms": [1e3 * x / ITERS for x in times]}
        print(name, prec, res[f"{name} {prec}"], flush=True)
        save()
    del data

keys = calibration.per_image_keys(1, np.arange(1))
sc = sampling.SamplingConfig(1.5, 900, 0.96)
for prec, s in settings.items():
    with pipeline.precision_scope(s, jnp.float32):
        run = lambda: jax.block_until_ready(theta_lib.attention_statistics(vae_cfg, var_cfg, params, quant, policy,
                                                                           labels[:1], keys, sc, jnp.float32)[0])
        t = time.perf_counter(); run(); first = time.perf_counter() - t
        times = []
        for _ in range(3):
            t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    res[f"theta_stats float32 {prec}"] = {"first_s": first, "pass_ms": [1e3 * x for x in times]}
    print("theta stats", prec, res[f"theta_stats float32 {prec}"], flush=True)
    save()

print("\n| what | " + " | ".join(PRECISIONS) + " |\n|---|" + "---|" * len(PRECISIONS))
for name, key in (("attention unit, ms/iter", "blocks_0/attn"), ("FFN unit, ms/iter", "blocks_0/ffn"),
                  ("θ statistics pass (float32), ms", "theta_stats float32")):
    f = "per_iter_ms" if "unit" in name else "pass_ms"
    print(f"| {name} | " + " | ".join(f"{np.median(res[f'{key} {p}'][f]):.3f}" for p in PRECISIONS) + " |")
