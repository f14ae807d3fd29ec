"""Do the Pallas kernels lower and agree with the XLA math on this GPU (compiled, not interpret mode)?

The CPU tests run the kernels in interpret mode; Triton's lowering and its float32 division are only seen here.
Prints one line per case and writes OUT.json; exits 1 if a kernel fails to run or misses its bound, so a device
script can fall back to the XLA path:  python benchmarks/integer/kernel_check.py OUT.json
Bounds: activation codes may flip by one step where a float32 quotient lands on a rounding boundary (Triton's
division is not IEEE), at most 1e-3 of the codes; the attention within 1 % of
its own quantization error (the XLA quantized attention against the float one; a log2 code may flip at a boundary).
INTERPRET=1 runs the same cases in interpret mode (a CPU check of this script).
"""
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.quant import act_kernel, integer, sas_attention

INTERPRET = os.environ.get("INTERPRET") == "1"
PLANS = (integer.Plan(1024, 8, 1024, 8, 1024, "per_token"),       # d16 W8A8
         integer.Plan(1024, 4, 128, 6, 1024, "per_token"),        # d16 W4A6
         integer.Plan(1024, 4, 128, 4, 64, "per_group"),          # d16 W4A4
         integer.Plan(4096, 4, 128, 6, 4096, "signed_split"),     # d16 fc2 at W4A6
         integer.Plan(1920, 8, 1920, 8, 1920, "per_token"))       # d30 W8A8


def check_act(plan, dtype):
    rows = int(os.environ.get("ROWS", 4133))             # not a multiple of the kernel's tile
    x = jnp.asarray(np.random.RandomState(0).randn(rows, plan.in_features).astype(np.float32) * 3, dtype)
    got = jax.block_until_ready(jax.jit(lambda x: act_kernel.act_codes(plan, x, interpret=INTERPRET))(x))
    want = jax.jit(lambda x: integer.act_codes(plan, x))(x)
    codes_off = float(np.mean(np.asarray(got[0]) != np.asarray(want[0])))
    scale_err = float(np.max(np.abs(np.asarray(got[1], np.float64) - np.asarray(want[1], np.float64))
                             / np.abs(np.asarray(want[1], np.float64))))
    return {"codes_differing": codes_off, "scale_max_rel": scale_err, "ok": codes_off <= 1e-3 and scale_err <= 1e-6}


def rms(a) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(a))))


def check_attn(b, t, s, h, d, a_bits, sas):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.float32) for kk, n in zip(ks, (t, s, s)))
    outs = [jax.block_until_ready(sas_attention.sas_attention(q, k, v, d ** -0.5, a_bits=a_bits, theta=0.0036,
                                                              shift_and_sum=sas, kernel=kern,
                                                              interpret=INTERPRET))
            for kern in ("xla", "pallas")]
    fp = sas_attention.sas_attention(q, k, v, d ** -0.5, a_bits=a_bits, quantize_qk=False, quantize_av=False)[0]
    err, q_err = rms(outs[1][0] - outs[0][0]), rms(outs[0][0] - fp)
    mean_err = float(jnp.max(jnp.abs(outs[1][1] - outs[0][1])))
    return {"out_rel_rms": err / rms(outs[0][0]), "over_quant_error": err / q_err,
            "mean_attention_max_abs": mean_err, "ok": err <= 0.01 * q_err}


def main(out):
    res = {"device": jax.devices()[0].device_kind, "cases": []}
    cases = [(f"act {p.coder} k{p.in_features} w{p.w_bits}g{p.w_group} a{p.a_bits}g{p.a_group} {dt.__name__}",
              lambda p=p, dt=dt: check_act(p, dt)) for p in PLANS for dt in (jnp.float32, jnp.bfloat16)]
    cases += [(f"attn b{b} t{t} s{s} h{h} d{d} a{a} sas={sas}", lambda c=(b, t, s, h, d, a, sas): check_attn(*c))
              for b, t, s, h, d, a, sas in ((2, 256, 680, 16, 64, 6, True), (2, 169, 511, 16, 64, 6, True),
                                            (2, 100, 100, 30, 64, 4, False))]
    for name, fn in cases:
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001  (a lowering failure is the finding)
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            traceback.print_exc()
        res["cases"].append({"case": name, **r})
        print(name, json.dumps(r), flush=True)
    res["ok"] = all(c["ok"] for c in res["cases"])
    res["act_ok"] = all(c["ok"] for c in res["cases"] if c["case"].startswith("act"))
    res["attn_ok"] = all(c["ok"] for c in res["cases"] if c["case"].startswith("attn"))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print("kernels", "ok" if res["ok"] else "FAILED", "act", res["act_ok"], "attn", res["attn_ok"], flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
