"""Integer Linears at VAR's shapes on one GPU: bf16 GEMM vs XLA's integer dot vs the Pallas kernel (issue 16).

  python benchmarks/integer/bench_gemm.py OUT.json [quick]

Rows: one Linear of the last scale of a batch-64 call (M = 128·256 rows) and of scale 13 (128·169), random data.
Columns: ms of the whole Linear (activation codes + product + epilogue + bias) and of the product alone (codes
given); a small sweep of the kernel's tile/warps/stages on each shape; the activation codes by XLA and by the
one-pass kernel (`act_kernel.py`, three tilings), and the whole Linear with the latter (`*_actk_ms`). Median of 20
after warm-up.
"""
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax import benchmarking
from varq_jax.quant import act_kernel, int_kernel, integer, quantizers, state
from varq_jax.quant.policy import QuantPolicy

SHAPES = {"d16_qkv": (1024, 3072), "d16_fc1": (1024, 4096), "d16_fc2": (4096, 1024),
          "d30_qkv": (1920, 5760), "d30_fc1": (1920, 7680), "d30_fc2": (7680, 1920)}
QUICK = ("d16_qkv", "d30_fc1", "d30_fc2")
CONFIGS = ((8, 8), (4, 6), (4, 4))


def timed(fn, *args):
    return benchmarking.median_time(jax.jit(fn), *args, repeats=20, warmup=2) * 1e3


def main(out, quick=False):
    rows = []
    rng = np.random.RandomState(0)
    for m in ((32768,) if quick else (32768, 21632)):
        for name, (k, n) in SHAPES.items():
            if quick and name not in QUICK:
                continue
            site = name.split("_")[1]
            site = {"qkv": "mat_qkv"}.get(site, site)
            x = jnp.asarray(rng.randn(m, k), jnp.bfloat16)
            if site == "fc2":
                x = jax.nn.gelu(x.astype(jnp.float32)).astype(jnp.bfloat16)
            w = rng.randn(k, n).astype(np.float32) * 0.02
            bias = jnp.zeros((n,), jnp.float32)
            bf16 = timed(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16) + bias.astype(jnp.bfloat16),
                         x, jnp.asarray(w, jnp.bfloat16))
            for wb, ab in CONFIGS:
                rule = QuantPolicy(w_bits=wb, a_bits=ab).rule_for(f"blocks_0/{'attn' if site in ('mat_qkv',) else 'ffn'}/{site}")
                p = integer.plan(rule, site, k)
                g = rule.weight_group(k)
                d, z = quantizers.weight_minmax_params(w, wb, g)
                form = integer.weight_form(p, state.integer_codes(w, {"delta": d, "zero_point": z}, wb, False), d, z)
                codes = jax.jit(functools.partial(integer.act_codes, p))(x)
                row = {"shape": name, "M": m, "K": k, "N": n, "config": f"W{wb}A{ab}", "bf16_ms": bf16}
                for kern in ("xla", "pallas"):
                    try:
                        row[f"{kern}_ms"] = timed(lambda a: integer.dense(p, a, form, bias, jnp.bfloat16, kern), x)
                        if kern == "xla":
                            row["xla_gemm_ms"] = timed(lambda c: integer.matmul_xla(p, *c, form), codes)
                        else:
                            best = None
                            for bm, bn, nw, ns in ((128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3),
                                                   (64, 128, 4, 4), (128, 64, 4, 3), (256, 128, 8, 3)):
                                f = lambda c: int_kernel.matmul(p, *c, form, bias, jnp.bfloat16, block_m=bm,
                                                                block_n=bn, num_warps=nw, num_stages=ns)
                                t = timed(f, codes)
                                row[f"pallas_gemm_ms_bm{bm}_bn{bn}_w{nw}_s{ns}"] = t
                                best = t if best is None else min(best, t)
                            row["pallas_gemm_ms"] = best
                    except Exception as e:
                        row[f"{kern}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["act_codes_ms"] = timed(functools.partial(integer.act_codes, p), x)
                try:                                   # the one-pass activation kernel, and whole Linears with it
                    for bm, nw in ((8, 2), (16, 4), (32, 4)):
                        row[f"act_kernel_ms_bm{bm}_w{nw}"] = timed(
                            functools.partial(act_kernel.act_codes, p, block_m=bm, num_warps=nw), x)
                    for kern in ("xla", "pallas"):
                        row[f"{kern}_actk_ms"] = timed(
                            lambda a: integer.dense(p, a, form, bias, jnp.bfloat16, kern, act="pallas"), x)
                except Exception as e:
                    row["act_kernel_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(out, "w") as f:
                    json.dump({"device": benchmarking.device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2)
