"""One d16 attention unit's 5,000 AdaRound iterations: chunked (ReconConfig.chunk_iters=500, progress between
scans) vs one scan, median and spread of RUNS warm runs each (compile apart), float32 at HIGHEST precision.

  python benchmarks/precision/bench_chunked.py OUT_DIR [runs]
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

from varq_jax.models import zoo  # noqa: E402
from varq_jax.models.build import init_params  # noqa: E402
from varq_jax.quant import capture as cap, pipeline, reconstruction as rec, state  # noqa: E402
from varq_jax.quant.policy import QuantPolicy  # noqa: E402

out, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
vae_cfg, var_cfg = zoo.preset("d16")
params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
policy = QuantPolicy(w_bits=4, a_bits=6, phase="hard")
quant = state.set_theta(state.init_quant_state(params["var"], policy), 0.0036)
rng = np.random.default_rng(0)
n = 32
labels = rng.integers(0, var_cfg.num_classes, n).astype(np.int32)
tokens = [rng.integers(0, var_cfg.vocab_size, (n, pn * pn)).astype(np.int32) for pn in var_cfg.patch_nums]
tgt = cap.target_by_name(var_cfg, "blocks_0/attn")
res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "unit": tgt.name, "iters": 5000}
with pipeline.precision_scope(pipeline.PTQSettings(), jnp.float32):
    data = cap.capture(vae_cfg, var_cfg, params, labels, tokens, tgt)
    mp, mq = cap.subtree(params["var"], tgt.path), cap.subtree(quant, tgt.path)
    rc0 = rec.ReconConfig(iters=5000, measure_errors=False)
    for name, chunk in (("one scan", 0), ("chunked 500", 500)):
        rc = dataclasses.replace(rc0, chunk_iters=chunk)
        reports = []
        run = lambda: rec.reconstruct_module(var_cfg, tgt, mp, mq, data, policy, rc, jax.random.PRNGKey(1),
                                             lambda d, t, l: reports.append(d))
        t = time.perf_counter(); run(); first = time.perf_counter() - t
        times = []
        for _ in range(runs):
            reports.clear()
            t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
        res[name] = {"first_s": first, "runs_s": times, "median_s": float(np.median(times)),
                     "reports_per_run": len(reports)}
        print(name, res[name], flush=True)
os.makedirs(out, exist_ok=True)
json.dump(res, open(os.path.join(out, "chunked_d16.json"), "w"), indent=1)
a, b = res["one scan"], res["chunked 500"]
print(f"\n| d16 blocks_0/attn, 5,000 iterations | median (min–max) of {runs} | compile+first |\n|---|---|---|")
for k, v in (("one scan", a), ("chunked 500", b)):
    print(f"| {k} | {v['median_s']:.2f} s ({min(v['runs_s']):.2f}–{max(v['runs_s']):.2f}) | {v['first_s']:.1f} s |")
print(f"chunked / one scan: {b['median_s'] / a['median_s']:.3f}")
