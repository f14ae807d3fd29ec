"""Times `fused_qkv.qkv_heads` (the Pallas kernel of GPU sampling) against the XLA math `var.qkv_heads` at the
row counts of d16/d30 sampling at batch 64 (scales 10 and 16, CFG-doubled). Needs a GPU.

  python benchmarks/kernels/qkv_postprocess.py
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.models import fused_qkv
from varq_jax.models.var import qkv_heads


def _time(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def main():
    print(jax.devices()[0].device_kind)
    print("| model | rows | XLA ms | Pallas ms | bandwidth-bound ms |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, c in (("d16", 1024), ("d30", 1920)):
        heads = c // 64
        for n in (128 * 100, 128 * 256):
            qkv = jnp.asarray(rng.normal(size=(n, 3 * c)), jnp.bfloat16)
            qb, vb = (jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32) for _ in range(2))
            s = jnp.asarray(rng.uniform(0.5, 3.0, size=heads), jnp.float32)
            xla = jax.jit(lambda *a: [t.astype(jnp.bfloat16) for t in qkv_heads(*a[:3], heads, a[3])])
            pallas = jax.jit(functools.partial(fused_qkv.qkv_heads, heads=heads))
            bound = 2 * qkv.size * qkv.dtype.itemsize / 3.0e12        # read qkv, write q, k, v at ≈ 3 TB/s
            t_xla, t_pallas = _time(xla, qkv, qb, vb, s), _time(pallas, qkv, qb, vb, s)
            print(f"| {name} | {n} | {t_xla * 1e3:.3f} | {t_pallas * 1e3:.3f} | {bound * 1e3:.3f} |")


if __name__ == "__main__":
    main()
