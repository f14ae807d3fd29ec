"""Device profiling of reconstruction pieces on d16 random weights (not committed)."""
import collections, dataclasses, glob, json, os, sys, time
from varq_jax import cli
cli.configure_xla()
import jax, jax.numpy as jnp, numpy as np
from jax.profiler import ProfileData
from varq_jax.models import zoo
from varq_jax.models.build import init_params
from varq_jax.quant import state, capture as cap, reconstruction as rec
from varq_jax.quant.policy import QuantPolicy

out = sys.argv[1]; preset = sys.argv[2] if len(sys.argv) > 2 else "d16"
N = int(os.environ.get("NCAL", "256"))
res = {}
def save(): json.dump(res, open(os.path.join(out, f"prof_recon_{preset}.json"), "w"), indent=1)
def log(k, v): res[k] = v; print(k, v, flush=True); save()

vae_cfg, var_cfg = zoo.preset(preset)
params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
policy = QuantPolicy(w_bits=4, a_bits=6, rounding="hard")
quant = state.set_theta(state.init_quant_state(params["var"], policy), 0.0036)
rng = np.random.default_rng(0)
labels = rng.integers(0, var_cfg.num_classes, N).astype(np.int32)
tokens = [rng.integers(0, var_cfg.vocab_size, (N, pn * pn)).astype(np.int32) for pn in var_cfg.patch_nums]

def trace(name, fn):
    d = "/tmp/trace_" + name
    with jax.profiler.trace(d):
        jax.block_until_ready(fn())
    f = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
    pd = ProfileData.from_file(f)
    tot = collections.Counter(); cnt = collections.Counter(); t0 = None; t1 = 0
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"): continue
        for line in plane.lines:
            for ev in line.events:
                tot[ev.name] += ev.duration_ns; cnt[ev.name] += 1
                t0 = ev.start_ns if t0 is None else min(t0, ev.start_ns); t1 = max(t1, ev.start_ns + ev.duration_ns)
        break
    rows = [(n[:120], round(v / 1e6, 3), cnt[n]) for n, v in tot.most_common(40)]
    log(f"trace_{name}", {"kernel_ms": sum(tot.values()) / 1e6, "span_ms": (t1 - t0) / 1e6 if t0 else 0,
                          "kernels": sum(cnt.values()), "top": rows})

rc = rec.ReconConfig()
for name in ["blocks_0/ada_lin", "blocks_0/attn", "blocks_0/ffn", "blocks_1/attn", "blocks_1/ffn"]:
    tgt = cap.target_by_name(var_cfg, name)
    t = time.perf_counter()
    data = cap.capture(vae_cfg, var_cfg, params, labels, tokens, tgt, batch_size=rc.capture_batch)
    jax.block_until_ready(data); log(f"{name}/capture_s", time.perf_counter() - t)
    mp, mq = cap.subtree(params["var"], tgt.path), cap.subtree(quant, tgt.path)
    t = time.perf_counter()
    e = rec.module_error(var_cfg, tgt, mp, mq, data, policy, "nearest", rc)
    log(f"{name}/error_nearest_s", time.perf_counter() - t)
    rel = cap.trainable_linears(policy, tgt, mp)
    soft = cap.standalone_policy(policy, tgt, mp, rounding="soft")
    a0 = rec.init_module_alpha(mp, mq, rel)
    segs = cap.segments(var_cfg, tgt)
    for iters in (200, 1200) if "blocks_0" in name else (200,):
        r = dataclasses.replace(rc, iters=iters).optimisation_only()
        t = time.perf_counter()
        jax.block_until_ready(rec.optimize_alpha(tgt.spec, var_cfg, soft, r, segs, mp, mq, a0, data.inputs, data.outputs, jax.random.PRNGKey(1)))
        log(f"{name}/alpha_{iters}_first_s", time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(rec.optimize_alpha(tgt.spec, var_cfg, soft, r, segs, mp, mq, a0, data.inputs, data.outputs, jax.random.PRNGKey(2)))
        log(f"{name}/alpha_{iters}_warm_s", time.perf_counter() - t)
    if name in ("blocks_0/attn", "blocks_0/ffn"):
        r = dataclasses.replace(rc, iters=200).optimisation_only()
        trace(name.replace("/", "_"), lambda: rec.optimize_alpha(tgt.spec, var_cfg, soft, r, segs, mp, mq, a0, data.inputs, data.outputs, jax.random.PRNGKey(3)))
    del data
