"""The integer GEMM of `integer.py` as one Pallas (Triton) kernel: int8 MMA per K step, the scales in its epilogue.

XLA runs a group-wise integer product as one int32 GEMM per K-block, written out in full ([nb, M, N] int32), and a
per-channel one with the scale pass as a separate fusion; this kernel keeps the int32 partial of each K-block in
registers, folds the zero point (row sums made with the activation codes) and the scales into a float32
accumulator at the block's end (one for all parts of a signed split; none beside the int32 one for a per-channel
Linear, which has a single K-block), and writes [M, N] once in the output dtype, bias added. At ≤ 4 bits it
unpacks two codes per byte in registers (each packed chunk is two int8 dots). Tests run it in interpret mode against
`integer.matmul_xla`.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from varq_jax.quant import integer, pallas_triton

BLOCK_M, BLOCK_N = 128, 64          # the fastest of six tilings on an H200 (d16 qkv at W8A8, W4A6, W4A4)
NUM_WARPS, NUM_STAGES = 4, 3


def _block_n(n: int, widest: int = BLOCK_N) -> int:
    for bn in (256, 128, 64, 32, 16):
        if bn > widest:
            continue
        if n % bn == 0:
            return bn
    raise ValueError(f"the integer kernel needs output features divisible by 16, got {n}")


def _kernel(x_ref, as_ref, az_ref, r_ref, w_ref, ws_ref, wz_ref, t_ref, b_ref, o_ref, *, p, parts, bm, bn):
    rows, cols = pl.ds(pl.program_id(0) * bm, bm), pl.ds(pl.program_id(1) * bn, bn)
    kt, steps = p.chunk, p.block // p.chunk
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.int32)

    def block(b):
        """The K-block's scaled contribution per part (the int32 partials live only inside it)."""
        def step(st, prods):
            k0 = b * p.block + st * kt
            out = []
            for s, prod in enumerate(prods):
                if p.packed:
                    h = kt // 2
                    w = w_ref[pl.ds(k0 // 2, h), cols]
                    lo = jax.lax.shift_right_arithmetic(jnp.left_shift(w, jnp.int8(4)), jnp.int8(4))
                    hi = jax.lax.shift_right_arithmetic(w, jnp.int8(4))
                    prod = prod + dot(x_ref[s, rows, pl.ds(k0, h)], lo) + dot(x_ref[s, rows, pl.ds(k0 + h, h)], hi)
                else:
                    prod = prod + dot(x_ref[s, rows, pl.ds(k0, kt)], w_ref[pl.ds(k0, kt), cols])
                out.append(prod)
            return tuple(out)

        prods = jax.lax.fori_loop(0, steps, step, tuple(jnp.zeros((bm, bn), jnp.int32) for _ in range(parts)))
        w_scale, w_zero, t = ws_ref[pl.ds(b, 1), cols], wz_ref[pl.ds(b, 1), cols], t_ref[pl.ds(b, 1), cols]
        ab = (b * p.block) // p.a_group
        out = []
        for s, prod in enumerate(prods):
            j = (prod - r_ref[s, rows, pl.ds(b, 1)] * w_zero).astype(jnp.float32)
            a_s, a_z = as_ref[s, rows, pl.ds(ab, 1)], az_ref[s, rows, pl.ds(ab, 1)]
            out.append(a_s * (w_scale * j - a_z * t))
        return sum(out)

    if p.num_blocks == 1:      # per channel: no float accumulator beside the int32 one (half the registers)
        acc = block(0)
    else:
        acc = jax.lax.fori_loop(0, p.num_blocks, lambda b, acc: acc + block(b), jnp.zeros((bm, bn), jnp.float32))
    o_ref[rows, cols] = (acc + b_ref[pl.ds(0, 1), cols]).astype(o_ref.dtype)


def matmul(p: "integer.Plan", codes, a_scale, a_zero, rows, w: dict, bias=None, out_dtype=jnp.float32,
           interpret: bool = False, block_m: int = 0, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
           num_stages: int = NUM_STAGES):
    """Σᵢ ẋᵢ ŵᵢₒ (+ bias) [M, N] in out_dtype from `integer.act_codes` output and a weight form; block_m = 0 picks
    the tile from M."""
    parts, m, _ = codes.shape
    w_scale, w_zero, t = integer.epilogue_terms(p, w)
    n = w_scale.shape[1]
    bm, bn = block_m or pallas_triton.tile(m, BLOCK_M), _block_n(n, block_n)
    mp = -(-m // bm) * bm
    if mp != m:
        pad = ((0, 0), (0, mp - m), (0, 0))
        codes, a_scale, a_zero, rows = (jnp.pad(a, pad) for a in (codes, a_scale, a_zero, rows))
    bias = jnp.zeros((1, n), jnp.float32) if bias is None else bias.astype(jnp.float32).reshape(1, n)
    params = pallas_triton.pallas_call_params(interpret, num_warps, num_stages)
    out = pl.pallas_call(
        functools.partial(_kernel, p=p, parts=parts, bm=bm, bn=bn), grid=(mp // bm, n // bn),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype), interpret=interpret, **params,
    )(codes, a_scale.astype(jnp.float32), a_zero.astype(jnp.float32), rows, w["codes"], w_scale, w_zero, t, bias)
    return out[:m]
