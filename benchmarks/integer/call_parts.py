"""Where a sampling call's time goes, from its parts timed alone at the call's own shapes (issue 16).

`benchmarking.time_breakdown` charges a profiled call's kernels to named scopes, but only where the profiler sees
the GPU's kernels (session 16's H200 trace held none). This needs no profiler. Each part of one KV-cached call is
jitted and timed alone, at the shapes the call runs it at:
- every Linear site of a block (AdaLN, qkv, proj, fc1, fc2) at each scale, with M = 2B·pn² rows (CFG doubles the
  batch; AdaLN has 2B rows);
- the Linears outside the blocks (word embedding, the head's AdaLN, the head);
- each scale's attention, T = pn² queries over the S = Σ pn² cached keys.
Each part runs once in bf16 (cuDNN's attention, as the FP model) and once as the quantized model runs it (integer
codes and GEMMs; XLA's or the kernel's activation codes and attention); a quantized Linear's activation-code pass is
also timed alone (`act_codes`, the quantization pass inside its time). Times are summed over the scales and
multiplied by the depth. The rest is the whole call (from an `experiments.benchmark` row of the same lease, given
as --calls) minus the parts: sampling, the VQVAE, cache writes, launches and fusion across parts.
  python benchmarks/integer/call_parts.py OUT.json d16:64:w4a6sas,d30:64:w8a8 [act_kernel attn_kernel]
"""
import collections
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax import benchmarking
from varq_jax.models import var as var_lib
from varq_jax.models import zoo
from varq_jax.quant import execution, integer, quantizers, rules, sas_attention, state
from varq_jax.quant.policy import QuantPolicy

THETA = 0.0036


def timed(fn, *args, repeats=10) -> float:
    return benchmarking.median_time(jax.jit(fn), *args, repeats=repeats, warmup=2)


def _policy(config: str) -> QuantPolicy:
    sas = config.endswith("sas")
    w, a = config.removesuffix("sas").removeprefix("w").split("a")
    return QuantPolicy(w_bits=int(w), a_bits=int(a), shift_and_sum=sas)


def _linear_parts(var_cfg, policy, batch, act, rng, interpret):
    """{part: (bf16 s, quantized s)} of one block's Linears and of those outside the blocks (embedding, the head's
    AdaLN and the head), summed over the scales."""
    ip = execution.IntegerPolicy.of(policy, act_kernel=act, interpret=interpret)
    sites = [s for s in rules.model_sites(var_cfg) if s.kind == rules.LINEAR
             and (s.path.startswith("blocks_0/") or not s.path.startswith("blocks_"))]
    out = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for site in sites:
        rule = policy.rule_for(site.path)
        k, n = site.in_features, site.out_features
        w = rng.randn(k, n).astype(np.float32) * 0.02
        bias = jnp.zeros((n,), jnp.float32)
        wb = jnp.asarray(w, jnp.bfloat16)
        form = None
        if rule.weights and rule.acts:
            p = integer.plan(rule, site.name, k, site.path)
            d, z = quantizers.weight_minmax_params(w, rule.w_bits, rule.weight_group(k))
            form = integer.weight_form(p, state.integer_codes(w, {"delta": d, "zero_point": z}, rule.w_bits, False),
                                       d, z)
        per_image = site.name in ("ada_lin", "shared_ada_lin", "head_nm")      # conditioning: one row an image
        rows = [2 * batch * (1 if per_image else pn * pn) for pn in var_cfg.patch_nums]
        for m in rows:
            x = jnp.asarray(rng.randn(m, k), jnp.bfloat16)
            if site.name == "fc2":
                x = jax.nn.gelu(x.astype(jnp.float32)).astype(jnp.bfloat16)
            t_bf16 = timed(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16) + bias.astype(a.dtype),
                           x, wb)
            t_q = t_bf16 if form is None else timed(
                lambda a: integer.dense(p, a, form, bias, jnp.bfloat16, ip.gemm(p), interpret=interpret, act=act), x)
            t_codes = 0.0 if form is None else timed(lambda a: integer.act_codes_with(p, a, act, interpret), x)
            part = f"linear:{site.name}" if site.path.startswith("blocks_") else f"outside blocks:{site.name}"
            out[part][0] += t_bf16
            out[part][1] += t_q
            out[part][2] += t_codes
    return out


def _attention_parts(var_cfg, policy, batch, attn, rng, interpret):
    """(bf16 s, quantized s) of every scale's attention of one block."""
    rule = policy.rule_for("blocks_0/attn")
    h, d = var_cfg.heads, var_cfg.width // var_cfg.heads
    total = [0.0, 0.0]
    seen = 0
    for pn in var_cfg.patch_nums:
        t, seen = pn * pn, seen + pn * pn
        q, k, v = (jnp.asarray(rng.randn(2 * batch, n, h, d), jnp.bfloat16) for n in (t, seen, seen))
        total[0] += timed(lambda q, k, v: var_lib.attention(q, k, v, d ** -0.5), q, k, v)
        if rule.attn:
            total[1] += timed(lambda q, k, v: sas_attention.sas_attention(
                q, k, v, d ** -0.5, a_bits=rule.a_bits, theta=THETA, shift_and_sum=rule.shift_and_sum,
                kernel=attn, interpret=interpret)[0], q, k, v)
        else:
            total[1] += total[0]
    return total


def main(out, specs, act="xla", attn="xla", calls=None):
    interpret = jax.default_backend() != "gpu"
    res = {"device": benchmarking.device_name(), "act_kernel": act, "attn_kernel": attn, "rows": []}
    calls = calls or {}
    for spec in specs.split(","):
        preset, batch, config = spec.split(":")
        batch = int(batch)
        _, var_cfg = zoo.preset(preset) if preset != "tiny" else zoo.tiny()
        policy = _policy(config).check(var_cfg)
        rng = np.random.RandomState(0)
        parts = _linear_parts(var_cfg, policy, batch, act, rng, interpret)
        row = {"preset": preset, "batch": batch, "config": config, "depth": var_cfg.depth, "parts_s": {}}
        for name, (b, q, c) in parts.items():
            times = 1 if name.startswith("outside") else var_cfg.depth
            row["parts_s"][name] = {"bf16": b * times, "quantized": q * times, "act_codes": c * times}
        a = _attention_parts(var_cfg, policy, batch, attn, rng, interpret)
        row["parts_s"]["attention"] = {"bf16": a[0] * var_cfg.depth, "quantized": a[1] * var_cfg.depth}
        for mode in ("bf16", "quantized"):
            row[f"sum_{mode}_s"] = sum(v[mode] for v in row["parts_s"].values())
        row["act_codes_s"] = sum(v.get("act_codes", 0.0) for v in row["parts_s"].values())   # of sum_quantized_s
        for mode, key in (("bf16", f"{preset}:{batch}:fp"), ("quantized", f"{preset}:{batch}:{config}")):
            if key in calls:
                row[f"call_{mode}_s"] = calls[key]
                row[f"rest_{mode}_s"] = calls[key] - row[f"sum_{mode}_s"]
        res["rows"].append(row)
        print(f"{spec}: " + "; ".join(f"{k} {v['bf16'] * 1e3:.1f} → {v['quantized'] * 1e3:.1f} ms"
                                      for k, v in row["parts_s"].items())
              + f"; parts {row['sum_bf16_s'] * 1e3:.1f} → {row['sum_quantized_s'] * 1e3:.1f} ms"
              + f" (activation codes {row['act_codes_s'] * 1e3:.1f} ms of it)", flush=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def _calls(paths):
    """{preset:batch:config: whole-call s} from `experiments.benchmark` rows files (the same lease's)."""
    out = {}
    for path in filter(None, paths.split(",")):
        for r in json.load(open(path))["rows"]:
            if "s" in r:
                out[f"{r['preset']}:{r['batch']}:{r['config']}"] = r["s"]
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--calls=")]
    given = next((a.removeprefix("--calls=") for a in sys.argv[1:] if a.startswith("--calls=")), "")
    main(*args, calls=_calls(given))
