"""Sampler variants on d30 B64 (not committed). argv: out_dir tag plan; plan = 'name|exp+exp|flagset|trace;...'"""
import collections, functools, glob, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.profiler import ProfileData
from varq_jax import sampling, benchmarking as bm
from varq_jax.models import zoo, stack
from varq_jax.models.build import init_params
from varq_jax.models.vqvae import VQVAE
from varq_jax.models.var import VAR
out, tag, plan = sys.argv[1], sys.argv[2], sys.argv[3].split(";")
preset = os.environ.get("PRESET", "d30"); B = int(os.environ.get("BATCH", "64"))
res = {"device": bm.device_name(), "jax": jax.__version__}
def save(): json.dump(res, open(os.path.join(out, f"prof3_{tag}.json"), "w"), indent=1)
CB = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL", "xla_gpu_graph_min_graph_size": 1}
FLAGS = {"base": {}, "dsf": {"xla_gpu_enable_dynamic_slice_fusion": True}, "lt": {"xla_gpu_enable_cublaslt": True},
         "blr": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True}, "tall": {"xla_gpu_experimental_all_fusions_with_triton": True}, "tga": {"xla_gpu_triton_gemm_any": True},
         "fat": {"xla_gpu_experimental_enable_fusion_autotuner": True}, "unr": {"xla_gpu_command_buffer_unroll_loops": True},
         "nocb": None}
vae_cfg, var_cfg = zoo.preset(preset)
params = jax.jit(init_params, static_argnums=(0, 1))(vae_cfg, var_cfg, jax.random.PRNGKey(0))
params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
labels = jnp.arange(B, dtype=jnp.int32); keys = jax.random.split(jax.random.PRNGKey(1), B)
def trace(name, fn):
    d = "/tmp/trace_" + name
    with jax.profiler.trace(d):
        jax.block_until_ready(fn())
    f = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
    pd = ProfileData.from_file(f)
    tot = collections.Counter(); cnt = collections.Counter(); evs = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"): continue
        lines = [l for l in plane.lines if "stream" in l.name.lower()] or [l for l in plane.lines if "XLA" not in l.name]
        for line in lines:
            for ev in line.events:
                tot[ev.name] += ev.duration_ns; cnt[ev.name] += 1
                evs.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
        break
    evs.sort()
    busy = 0; gaps = []; cur_s, cur_e, last = evs[0][0], evs[0][1], evs[0][2]
    for s_, e_, n_ in evs[1:]:
        if s_ > cur_e:
            busy += cur_e - cur_s; gaps.append((s_ - cur_e, last[:60], n_[:60])); cur_s = s_
        if e_ > cur_e: cur_e = e_; last = n_
    busy += cur_e - cur_s
    span = evs[-1][1] - evs[0][0]
    gaps.sort(reverse=True)
    small = sum(g for g, _, _ in gaps if g < 20000)
    host = collections.Counter(); hcnt = collections.Counter()
    for plane in pd.planes:
        if plane.name.startswith("/device:GPU"): continue
        for line in plane.lines:
            for ev in line.events:
                host[(plane.name[:20], line.name[:20], ev.name[:80])] += ev.duration_ns; hcnt[(plane.name[:20], line.name[:20], ev.name[:80])] += 1
    res[f"host_{name}"] = [(k, round(v / 1e6, 3), hcnt[k]) for k, v in host.most_common(40)]
    rows = [(n[:140], round(v / 1e6, 3), cnt[n]) for n, v in tot.most_common(150)]
    res[f"trace_{name}"] = {"kernel_ms": sum(tot.values()) / 1e6, "kernels": sum(cnt.values()), "span_ms": span / 1e6,
                            "busy_ms": busy / 1e6, "n_gaps": len(gaps), "small_gap_ms": small / 1e6,
                            "big_gaps": [(round(g / 1e6, 3), a, b) for g, a, b in gaps[:30]], "top": rows,
                            "lines": sorted({l.name for p in pd.planes if p.name.startswith("/device:GPU") for l in p.lines})}
    print(name, "kernel total", sum(tot.values()) / 1e6, "n", sum(cnt.values()), "span", span / 1e6, "busy", busy / 1e6,
          "small gaps", small / 1e6, flush=True)
    save()
ref_tokens = None

for item in plan:
    name, exps, flagset, do_trace = item.split("|")
    exps = set(e for e in exps.split("+") if e)

    opts = None
    if FLAGS.get(flagset.split("+")[0], 0) is not None:
        opts = dict(CB)
        for fs in flagset.split("+"): opts.update(FLAGS[fs])
    gen = jax.jit(functools.partial(sampling.generate, VQVAE(vae_cfg, jnp.bfloat16), VAR(var_cfg, jnp.bfloat16),
                                    sampling.SamplingConfig(1.5, 900, 0.96)), compiler_options=opts)
    try:
        t = time.perf_counter(); comp = gen.lower(params, None, labels, keys).compile(); ct = time.perf_counter() - t
        ms = bm.median_time(comp, params, None, labels, keys, repeats=5) * 1e3
        toks = np.concatenate([np.asarray(t_) for t_ in comp(params, None, labels, keys)[1]], 1)
        if ref_tokens is None: ref_tokens = toks
        res[name] = {"compile_s": ct, "ms": ms, "token_agree": float((toks == ref_tokens).mean())}
        print(tag, name, "compile", round(ct, 1), "ms", round(ms, 2), "agree", res[name]["token_agree"], flush=True)
        save()
        if do_trace == "1":
            open(os.path.join(out, f"hlo_{tag}_{name}.txt"), "w").write(comp.as_text())
            trace(name, lambda: comp(params, None, labels, keys))
    except Exception as e:
        res[name] = {"error": repr(e)[:3000]}; print(tag, name, "ERROR", repr(e)[:3000], flush=True); save()
