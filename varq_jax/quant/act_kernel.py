"""`integer.act_codes` as one Pallas (Triton) kernel: the range, the codes and their row sums in one pass.

XLA makes the activation codes of a Linear in separate fusions (the range reduction, the rounding, the row sums
over the codes): on an H200 that alone took 38–53 % of the bf16 GEMM it feeds (BENCHMARKS.md, integer execution).
Here each program takes `BLOCK_M` rows: per activation group it reads the group's chunks once for the range and
once more to round, writes the int8 codes and, per K-block, their sums — a memory-bound pass that reads the input
twice and writes a byte per element. The arithmetic is `integer._act_codes`'s, op for op; Triton's float32
division is not IEEE-rounded, so on the GPU a code can differ by one step where x/Δ lies within ulps of a
rounding boundary (as a last-ulp difference of the inputs does). Tests run it in interpret mode against the XLA
codes, which it must equal bit for bit.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from varq_jax.quant import integer, pallas_triton, quantizers
from varq_jax.quant.pallas_triton import round_even

BLOCK_M = 16
MAX_CHUNK = 128                    # input channels per load


def chunk(p: "integer.Plan") -> int:
    """Input channels per load: the largest power of two ≤ MAX_CHUNK dividing the K-block (Triton's blocks are
    powers of two; d30's 1920-wide blocks load 128 at a time)."""
    c = MAX_CHUNK
    while p.block % c:
        c //= 2
    return c


def _kernel(x_ref, c_ref, s_ref, z_ref, r_ref, *, p, bm, kc):
    rows = pl.ds(pl.program_id(0) * bm, bm)
    n = 2 ** p.a_bits
    split = p.coder == "signed_split"
    parts = 2 if split else 1
    load = lambda k0: x_ref[rows, pl.ds(k0, kc)].astype(jnp.float32)
    zeros = jnp.zeros((bm, 1), jnp.float32)

    def group(ag, carry):
        g0 = ag * p.a_group

        def stats(c, hl):
            v = load(g0 + c * kc)
            return (jnp.maximum(hl[0], jnp.max(v, axis=1, keepdims=True)),
                    jnp.minimum(hl[1], jnp.min(v, axis=1, keepdims=True)))

        hi, lo = jax.lax.fori_loop(0, p.a_group // kc, stats, (jnp.full((bm, 1), -jnp.inf, jnp.float32),
                                                              jnp.full((bm, 1), jnp.inf, jnp.float32)))
        if split:
            half = n / 2 - 1
            d_neg, d_pos = jnp.maximum(-lo / half, quantizers.EPS), jnp.maximum(hi / half, quantizers.EPS)
            scales, zero_points = (d_neg, d_pos), (zeros, zeros)

            def codes(v):
                return (jnp.clip(round_even(jnp.where(v <= 0, v, 0.0) / d_neg), -half, 0),
                        jnp.clip(round_even(jnp.where(v > 0, v, 0.0) / d_pos), 0, half))
        else:
            delta = jnp.maximum((hi - lo) / (n - 1), quantizers.EPS)
            zp = -round_even(lo / delta)
            scales, zero_points = (delta,), (zp - n // 2,)

            def codes(v):
                return (jnp.clip(round_even(v / delta) + zp, 0, n - 1) - n // 2,)

        for s in range(parts):
            s_ref[s, rows, pl.ds(ag, 1)] = scales[s]
            z_ref[s, rows, pl.ds(ag, 1)] = zero_points[s]

        def block(b, carry):
            k_b = g0 + b * p.block

            def step(c, sums):
                k0 = k_b + c * kc
                qs = codes(load(k0))
                for s, q in enumerate(qs):
                    c_ref[s, rows, pl.ds(k0, kc)] = q.astype(jnp.int8)
                return tuple(acc + jnp.sum(q.astype(jnp.int32), axis=1, keepdims=True) for acc, q in zip(sums, qs))

            sums = jax.lax.fori_loop(0, p.block // kc, step, tuple(jnp.zeros((bm, 1), jnp.int32)
                                                                  for _ in range(parts)))
            for s in range(parts):
                r_ref[s, rows, pl.ds(ag * (p.a_group // p.block) + b, 1)] = sums[s]
            return carry

        jax.lax.fori_loop(0, p.a_group // p.block, block, 0)
        return carry

    jax.lax.fori_loop(0, p.in_features // p.a_group, group, 0)


def act_codes(p: "integer.Plan", x, interpret: bool = False, block_m: int = BLOCK_M, num_warps: int = 4):
    """What `integer.act_codes(p, x)` returns, for x [M, K]: (codes int8 [S, M, K], scale float32 [S, M, nbₐ],
    zero float32 [S, M, nbₐ], row sums int32 [S, M, nb])."""
    m, k = x.shape
    if k != p.in_features:
        raise ValueError(f"inputs have {k} channels, the plan {p.in_features}")
    parts = 2 if p.coder == "signed_split" else 1
    kc = chunk(p)
    mp = -(-m // block_m) * block_m
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    na = k // p.a_group
    params = pallas_triton.pallas_call_params(interpret, num_warps, num_stages=1)
    out = pl.pallas_call(
        functools.partial(_kernel, p=p, bm=block_m, kc=kc), grid=(mp // block_m,),
        out_shape=(jax.ShapeDtypeStruct((parts, mp, k), jnp.int8),
                   jax.ShapeDtypeStruct((parts, mp, na), jnp.float32),
                   jax.ShapeDtypeStruct((parts, mp, na), jnp.float32),
                   jax.ShapeDtypeStruct((parts, mp, p.num_blocks), jnp.int32)),
        interpret=interpret, **params,
    )(x)
    return tuple(a[:, :m] for a in out)
