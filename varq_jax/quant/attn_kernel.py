"""`sas_attention`'s quantized attention in three Pallas (Triton) passes that never write the [B, H, T, S] scores.

XLA's quantized attention writes the float32 scores, the probabilities, their log2 codes and the products back
and forth: at d16 batch 64 about 9·10⁹ scores per call, some 75 GB per pass — the likely gap between the
simulation (0.61× our bf16, whose attention is cuDNN's fused kernel) and bf16. Shift-and-sum needs the mean
probability of every key over all queries before V can be quantized, so the passes are, per (batch, head):
  1. per query tile: the row max and then the row sum of exp(s − max) (two sweeps over the keys, so the
     normaliser is the XLA softmax's sum of exp(s − max), not an online rescaled one);
  2. per key tile: Σ_t p over the query tiles → the mean attention ā (the θ statistic);
  3. (XLA, small) the shift-and-sum orders from ā and V̂; then per query tile: p = exp(s − max)/sum, its log2
     code against the row max 1/sum, Σ p̂·V̂.
The scores are recomputed in each pass from the fake-quantized operands (made by XLA: Q per token, K per channel
over all tokens). The arithmetic of each element is the XLA path's; sums run in another order, so a probability can
differ in its last ulp and its log2 code then by one step at a rounding boundary (as any reordering would). Tests
run the kernels in interpret mode against `sas_attention`'s XLA path.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from varq_jax.quant import pallas_triton, quantizers
from varq_jax.quant.pallas_triton import round_even

BLOCK_T, BLOCK_S = 64, 64
_NT = (((1,), (1,)), ((), ()))            # a [t, d] · k [s, d] → [t, s]


def _scores(a, k_ref, bh, j, bs, s_len):
    k = k_ref[bh, pl.ds(j * bs, bs), :]
    s = jax.lax.dot_general(a, k, _NT, preferred_element_type=jnp.float32)
    cols = j * bs + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where(cols < s_len, s, -jnp.inf)


def _stats_kernel(a_ref, k_ref, m_ref, l_ref, *, bt, bs, ns, s_len):
    bh, rows = pl.program_id(0), pl.ds(pl.program_id(1) * bt, bt)
    a = a_ref[bh, rows, :]
    m = jax.lax.fori_loop(0, ns, lambda j, m: jnp.maximum(m, jnp.max(_scores(a, k_ref, bh, j, bs, s_len), axis=1)),
                          jnp.full((bt,), -jnp.inf, jnp.float32))
    l = jax.lax.fori_loop(0, ns, lambda j, l: l + jnp.sum(jnp.exp(_scores(a, k_ref, bh, j, bs, s_len) - m[:, None]),
                                                          axis=1), jnp.zeros((bt,), jnp.float32))
    m_ref[bh, rows] = m
    l_ref[bh, rows] = l


def _mean_kernel(a_ref, k_ref, m_ref, l_ref, o_ref, *, bt, bs, nt, t_len):
    bh, cols = pl.program_id(0), pl.ds(pl.program_id(1) * bs, bs)
    k = k_ref[bh, cols, :]

    def step(i, acc):
        rows = pl.ds(i * bt, bt)
        s = jax.lax.dot_general(a_ref[bh, rows, :], k, _NT, preferred_element_type=jnp.float32)
        p = jnp.exp(s - m_ref[bh, rows][:, None]) / l_ref[bh, rows][:, None]
        real = i * bt + jax.lax.broadcasted_iota(jnp.int32, p.shape, 0) < t_len
        return acc + jnp.sum(jnp.where(real, p, 0.0), axis=0)

    o_ref[bh, cols] = jax.lax.fori_loop(0, nt, step, jnp.zeros((bs,), jnp.float32)) / t_len


def _out_kernel(a_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, bt, bs, ns, s_len, n_codes):
    bh, rows = pl.program_id(0), pl.ds(pl.program_id(1) * bt, bt)
    a = a_ref[bh, rows, :]
    m, l = m_ref[bh, rows][:, None], l_ref[bh, rows][:, None]
    delta = jnp.maximum(1.0 / l, quantizers.EPS)             # the row max of p: exp(0) / sum

    def step(j, acc):
        p = jnp.exp(_scores(a, k_ref, bh, j, bs, s_len) - m) / l
        if n_codes:
            code = round_even(-jnp.log2(p / delta + 1e-20))
            p = jnp.where(code >= n_codes, 0.0, delta * jnp.exp2(-jnp.clip(code, 0, n_codes - 1)))
        return acc + jnp.dot(p, v_ref[bh, pl.ds(j * bs, bs), :], preferred_element_type=jnp.float32)

    o_ref[bh, rows, :] = jax.lax.fori_loop(0, ns, step, jnp.zeros((bt, a.shape[1]), jnp.float32))


def _heads_first(x, length):
    """[B, L, H, D] → [B·H, length, D] float32, zero-padded."""
    b, n, h, d = x.shape
    x = jnp.swapaxes(x.astype(jnp.float32), 1, 2).reshape(b * h, n, d)
    return jnp.pad(x, ((0, 0), (0, length - n), (0, 0)))


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def attention(q, k, v, scale, theta, a_bits, quantize_qk, quantize_av, shift_and_sum, interpret):
    """What `sas_attention._sas_attention` computes (out [B, T, H, D] in q.dtype, ā [B, H, S]), through the
    kernels; arguments as there (checked by `sas_attention.sas_attention`)."""
    b, t, h, d = q.shape
    s = k.shape[1]
    if not interpret and d % 16:
        raise ValueError(f"the attention kernels need a head size that is a multiple of 16 (Triton's dot), got {d}")
    a = q.astype(jnp.float32) * scale
    kf = k.astype(jnp.float32)
    if quantize_qk:
        a, kf = quantizers.quantize_q_operand(a, a_bits), quantizers.quantize_k_operand(kf, a_bits)
    bt, bs = pallas_triton.tile(t, BLOCK_T), pallas_triton.tile(s, BLOCK_S)
    tp, sp = -(-t // bt) * bt, -(-s // bs) * bs
    a, kf = _heads_first(a, tp), _heads_first(kf, sp)
    call = functools.partial(pl.pallas_call, interpret=interpret,
                             **pallas_triton.pallas_call_params(interpret, num_warps=4, num_stages=2))
    row = jax.ShapeDtypeStruct((b * h, tp), jnp.float32)
    m, l = call(functools.partial(_stats_kernel, bt=bt, bs=bs, ns=sp // bs, s_len=s), grid=(b * h, tp // bt),
                out_shape=(row, row))(a, kf)
    attn_mean = call(functools.partial(_mean_kernel, bt=bt, bs=bs, nt=tp // bt, t_len=t), grid=(b * h, sp // bs),
                     out_shape=jax.ShapeDtypeStruct((b * h, sp), jnp.float32))(a, kf, m, l)
    attn_mean = attn_mean[:, :s].reshape(b, h, s)
    vf = v.astype(jnp.float32)
    if quantize_av:
        orders = (quantizers.shift_orders(attn_mean, theta) if shift_and_sum
                  else jnp.zeros(attn_mean.shape, jnp.int32))
        vf = quantizers.quantize_v_shift_and_sum(vf, jnp.swapaxes(orders, 1, 2), a_bits)
    n_codes = 2 ** a_bits if quantize_av else 0
    out = call(functools.partial(_out_kernel, bt=bt, bs=bs, ns=sp // bs, s_len=s, n_codes=n_codes),
               grid=(b * h, tp // bt), out_shape=jax.ShapeDtypeStruct((b * h, tp, d), jnp.float32)
               )(a, kf, _heads_first(vf, sp), m, l)
    out = jnp.swapaxes(out[:, :t].reshape(b, h, t, d), 1, 2)
    return out.astype(q.dtype), attn_mean
