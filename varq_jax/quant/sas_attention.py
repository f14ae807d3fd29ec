"""Quantized attention of one scale block with shift-and-sum V (the official QSelfAttention / QuantMatMul).

q [B, T, H, D] are the queries of the current scale (not yet × the softmax scale); k, v [B, S, H, D] are exactly
the keys they may see (all cached scales ≤ the current one), so V's range and the shift-and-sum orders are
computed over the same tokens as in KV-cached inference. No mask: within a scale block every query sees every key.
"""
from typing import Optional, Tuple

import functools

import jax
import jax.numpy as jnp

from varq_jax.quant import quantizers

Array = jax.Array


def _check_qkv(q: Array, k: Array, v: Array):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"need q [B,T,H,D] and k, v [B,S,H,D]; got {q.shape}, {k.shape}, {v.shape}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head_dim")


@functools.partial(jax.jit, static_argnames=("bits", "quantize", "precision"))
def attention_logits(a: Array, k: Array, bits: int, quantize: bool = True, precision=None) -> Array:
    """QKᵀ [B, H, T, S] in float32 from A = q·scale [B, T, H, D] and k [B, S, H, D], operands fake-quantized
    (A per token / groups of 64, K per channel over tokens / per token groups of 64, by bits) when `quantize`."""
    a = a.astype(jnp.float32)
    k = k.astype(jnp.float32)
    if quantize:
        a = quantizers.quantize_q_operand(a, bits)
        k = quantizers.quantize_k_operand(k, bits)
    return jnp.einsum("bthd,bshd->bhts", a, k, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("bits", "quantize", "shift_and_sum", "precision"))
def attend_values(probs: Array, v: Array, bits: int, theta=None, quantize: bool = True,
                  shift_and_sum: bool = True, precision=None) -> Tuple[Array, Array]:
    """Â·V̂ [B, T, H, D] from softmax probabilities [B, H, T, S] and v [B, S, H, D], plus the mean FP attention
    over queries [B, H, S]. Orders clip(ceil(log2(ā/θ)), 0, 3) come from the unquantized probabilities; the
    probabilities get the log2 quantizer, V the shift-and-sum quantizer (plain rounding when shift_and_sum is off)."""
    probs = probs.astype(jnp.float32)
    attn_mean = jnp.mean(probs, axis=2)
    vf = v.astype(jnp.float32)
    if quantize:
        if shift_and_sum:
            if theta is None:
                raise ValueError("shift_and_sum needs theta")
            orders = quantizers.shift_orders(attn_mean, theta)
        else:
            orders = jnp.zeros(attn_mean.shape, jnp.int32)
        probs = quantizers.quantize_log2(probs, bits)
        vf = quantizers.quantize_v_shift_and_sum(vf, jnp.swapaxes(orders, 1, 2), bits)
    out = jnp.einsum("bhts,bshd->bthd", probs, vf, precision=precision, preferred_element_type=jnp.float32)
    return out, attn_mean


def sas_attention(q: Array, k: Array, v: Array, scale, *, a_bits: int, theta=None,
                  quantize_qk: bool = True, quantize_av: bool = True, shift_and_sum: bool = True,
                  precision: Optional[jax.lax.Precision] = None, kernel: str = "xla",
                  interpret: bool = False) -> Tuple[Array, Array]:
    """softmax(Q̂K̂ᵀ) → log2-quantized probabilities · shift-and-sum V̂, for one scale block.

    Returns (out [B, T, H, D] in q.dtype, mean FP attention over the queries [B, H, S] float32 — the statistic
    of the θ search). `scale` and `theta` may be traced scalars; theta is needed only with quantize_av and
    shift_and_sum. Bits, switches and precision are static. kernel 'pallas': the same through `attn_kernel`'s
    passes, which never write the scores (`interpret`: on the CPU, for tests; `precision` is then the kernels').
    """
    _check_qkv(q, k, v)
    quantizers.check_bits(a_bits)
    if kernel not in ("xla", "pallas"):
        raise ValueError(f"attention kernel must be xla or pallas, got {kernel!r}")
    if quantize_av and shift_and_sum:
        if theta is None:
            raise ValueError("shift_and_sum needs theta")
        if isinstance(theta, (int, float)) and not theta > 0:
            raise ValueError(f"theta must be positive, got {theta}")
    else:
        theta = None
    if kernel == "pallas":
        from varq_jax.quant import attn_kernel
        return attn_kernel.attention(q, k, v, scale, theta, a_bits, quantize_qk, quantize_av, shift_and_sum,
                                     interpret)
    return _sas_attention(q, k, v, scale, theta, a_bits, quantize_qk, quantize_av, shift_and_sum, precision)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _sas_attention(q, k, v, scale, theta, a_bits, quantize_qk, quantize_av, shift_and_sum, precision):
    logits = attention_logits(q.astype(jnp.float32) * scale, k, a_bits, quantize_qk, precision)
    probs = jax.nn.softmax(logits, axis=-1)
    out, attn_mean = attend_values(probs, v, a_bits, theta, quantize_av, shift_and_sum, precision)
    return out.astype(q.dtype), attn_mean
