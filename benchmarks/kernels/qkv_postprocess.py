"""Experiment for issue 2 (d30 sampling): one Pallas kernel for what follows the qkv GEMM of a VAR block.

The sampler's block does, after `mat_qkv`: add the q/v biases, L2-normalise q and k per head, scale q by the
per-head `scale_mul`, cast to the compute dtype. XLA emits this as two Triton normalisation fusions (q, k) that
run at about a third of the memory bandwidth on an H100 (d30, batch 64: ≈ 0.25 ms each per block at the last
scale against ≈ 0.08 ms bandwidth-bound), plus the v bias inside the cache-write fusions. This kernel does all
three per (row block, head) in one pass. Not wired into the library: run it on a GPU first.

  python benchmarks/kernels/qkv_postprocess.py --check        # CPU: Pallas interpret mode == the XLA math
  python benchmarks/kernels/qkv_postprocess.py                # GPU: table of XLA vs Pallas times
"""
import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def reference(qkv, q_bias, v_bias, scale_mul, heads):
    """The math of `var.SelfAttention` between the qkv GEMM and the attention (attn_l2_norm on)."""
    n, c3 = qkv.shape
    c, d = c3 // 3, c3 // 3 // heads
    x = qkv.astype(jnp.float32) + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
    q, k, v = (x[:, i * c:(i + 1) * c].reshape(n, heads, d) for i in range(3))
    norm = lambda t: t / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(t), -1, keepdims=True)), 1e-12)
    q = norm(q) * jnp.exp(jnp.minimum(scale_mul, math.log(100.0)))[:, None]
    return tuple(t.reshape(n, c).astype(qkv.dtype) for t in (q, norm(k), v))


def _kernel(q_ref, k_ref, v_ref, qb_ref, vb_ref, s_ref, qo_ref, ko_ref, vo_ref):
    def norm(t):
        return t / jnp.maximum(jnp.sqrt(jnp.sum(t * t, axis=-1, keepdims=True)), 1e-12)
    q = q_ref[...].astype(jnp.float32) + qb_ref[...].astype(jnp.float32)
    qo_ref[...] = (norm(q) * s_ref[...]).astype(qo_ref.dtype)
    ko_ref[...] = norm(k_ref[...].astype(jnp.float32)).astype(ko_ref.dtype)
    vo_ref[...] = (v_ref[...].astype(jnp.float32) + vb_ref[...].astype(jnp.float32)).astype(vo_ref.dtype)


def fused(qkv, q_bias, v_bias, scale_mul, heads, rows=64, interpret=False):
    """Pallas version of `reference`: grid (row blocks, heads), one [rows, head_dim] tile of q, k and v each."""
    n, c3 = qkv.shape
    c, d = c3 // 3, c3 // 3 // heads
    scale = jnp.repeat(jnp.exp(jnp.minimum(scale_mul, math.log(100.0))), d)[None]     # [1, C], per column
    part = lambda j: pl.BlockSpec((rows, d), lambda i, h: (i, j * heads + h))
    vec = pl.BlockSpec((1, d), lambda i, h: (0, h))
    out = jax.ShapeDtypeStruct((n, c), qkv.dtype)
    return pl.pallas_call(
        _kernel, grid=(pl.cdiv(n, rows), heads),
        in_specs=[part(0), part(1), part(2), vec, vec, vec],
        out_specs=[pl.BlockSpec((rows, d), lambda i, h: (i, h))] * 3,
        out_shape=[out, out, out], interpret=interpret,
    )(qkv, qkv, qkv, q_bias[None], v_bias[None], scale.astype(jnp.float32))


def _inputs(n, c, dtype, seed=0):
    rng = np.random.default_rng(seed)
    heads = c // 64
    return (jnp.asarray(rng.normal(size=(n, 3 * c)), dtype), jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32),
            jnp.asarray(rng.uniform(0.5, 3.0, size=heads), jnp.float32), heads)


def check():
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        qkv, qb, vb, s, heads = _inputs(256, 256, dtype)
        want = reference(qkv, qb, vb, s, heads)
        got = fused(qkv, qb, vb, s, heads, rows=64, interpret=True)
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol)
    print("Pallas (interpret) == reference for float32 and bfloat16")


def _time(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def bench():
    print(jax.devices()[0].device_kind)
    print("| model | rows | XLA ms | Pallas ms | bandwidth-bound ms |\n|---|---|---|---|---|")
    for name, c in (("d16", 1024), ("d30", 1920)):
        for n in (128 * 100, 128 * 256):
            qkv, qb, vb, s, heads = _inputs(n, c, jnp.bfloat16)
            xla = jax.jit(functools.partial(reference, heads=heads))
            best = min(_time(jax.jit(functools.partial(fused, heads=heads, rows=r)), qkv, qb, vb, s)
                       for r in (32, 64, 128))
            bound = 2 * qkv.size * qkv.dtype.itemsize / 3.0e12        # read qkv, write q, k, v at ≈ 3 TB/s
            print(f"| {name} | {n} | {_time(xla, qkv, qb, vb, s) * 1e3:.3f} | {best * 1e3:.3f} | {bound * 1e3:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="CPU correctness check in Pallas interpret mode")
    check() if parser.parse_args().check else bench()
