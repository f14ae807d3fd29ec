"""What follows the qkv GEMM of an L2-normalised attention, as one Pallas kernel on GPU (the unrolled sampler).

After `mat_qkv` the block adds the q/v biases, L2-normalises q and k per head, scales q per head and casts to
the compute dtype. XLA emits two normalisation fusions that reach about a third of an H100's memory bandwidth;
this kernel reads each [rows, head_dim] tile of q, k and v once and writes the three outputs (≈ 1.8× faster on
d30's last scale). The math is `var.qkv_heads`; tests check the two agree in Pallas' interpret mode.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
MAX_ROWS = 64        # rows per tile (the best of 32/64/128 on an H100 for d16 and d30)


def supported(qkv: Array, head_dim: int) -> bool:
    """On GPU, 16-bit GEMM outputs and a power-of-two head_dim ≥ 16 (a Triton tile dimension)."""
    return (jax.default_backend() == "gpu" and qkv.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def _rows_per_tile(n: int) -> int:
    """The largest power of two ≤ MAX_ROWS dividing n, so that no tile runs past the last row."""
    rows = 1
    while rows < MAX_ROWS and n % (2 * rows) == 0:
        rows *= 2
    return rows


def _kernel(q_ref, k_ref, v_ref, qb_ref, vb_ref, s_ref, qo_ref, ko_ref, vo_ref):
    def normalize(t):
        return t / jnp.maximum(jnp.sqrt(jnp.sum(t * t, axis=-1, keepdims=True)), 1e-12)
    q = q_ref[...].astype(jnp.float32) + qb_ref[...]
    qo_ref[...] = (normalize(q) * s_ref[...]).astype(qo_ref.dtype)
    ko_ref[...] = normalize(k_ref[...].astype(jnp.float32)).astype(ko_ref.dtype)
    vo_ref[...] = (v_ref[...].astype(jnp.float32) + vb_ref[...]).astype(vo_ref.dtype)


@functools.partial(jax.jit, static_argnames=("heads", "interpret"))
def qkv_heads(qkv: Array, q_bias: Array, v_bias: Array, head_scale: Array, heads: int, interpret: bool = False):
    """qkv [..., n, 3C] → q, k, v [..., n, heads, C / heads] in qkv's dtype; `var.qkv_heads` with a head_scale."""
    lead, c = qkv.shape[:-1], qkv.shape[-1] // 3
    d = c // heads
    flat = qkv.reshape(-1, 3 * c)
    n, rows = flat.shape[0], _rows_per_tile(flat.shape[0])
    part = lambda j: pl.BlockSpec((rows, d), lambda i, h: (i, j * heads + h))
    per_head = pl.BlockSpec((1, d), lambda i, h: (0, h))
    scale = jnp.repeat(head_scale.astype(jnp.float32), d)[None]
    out = jax.ShapeDtypeStruct((n, c), qkv.dtype)
    q, k, v = pl.pallas_call(
        _kernel, grid=(n // rows, heads),
        in_specs=[part(0), part(1), part(2), per_head, per_head, per_head],
        out_specs=[pl.BlockSpec((rows, d), lambda i, h: (i, h))] * 3,
        out_shape=[out, out, out], interpret=interpret,
    )(flat, flat, flat, q_bias.astype(jnp.float32)[None], v_bias.astype(jnp.float32)[None], scale)
    return tuple(t.reshape(*lead, heads, d) for t in (q, k, v))
