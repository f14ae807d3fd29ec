"""Fake quantizers of Shift-and-Sum PTQ as pure JAX functions (reference/SHIFT_AND_SUM.md §1–2).

Every quantizer returns the dequantized float32 tensor ("fake quant"). Rounding is straight-through (`round_ste`)
and clipping passes the gradient where the value lies inside the range, boundaries included, as `torch.clamp`
does. Dynamic ranges follow the official code: delta (and the signed-split scales) stay differentiable
functions of the tensor's min/max, zero points are constants.

Layouts are ours: Linear kernels [in, out], activations [..., channels], attention tensors [B, tokens, H, D].
"""
import inspect
from typing import Callable, Optional, Tuple

import einops
import jax
import jax.numpy as jnp

Array = jax.Array

MIN_BITS, MAX_BITS = 2, 8
WEIGHT_GROUP = 128        # input channels per weight group below 6 bits
ACT_GROUP = 64            # channels per activation group below 6 bits
GROUP_MIN_BITS = 6        # at or above this many bits, no groups
MAX_ORDER = 3             # highest shift-and-sum order (2^3 shifted copies)
EPS = 1e-6                # smallest quantization step
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


# Public quantizers are jitted with their bit width / grouping / mode static: eager calls then cost one compile,
# not one per primitive, and arguments are still validated (at trace time) before any work.
def _jit_bits(fn):
    params = inspect.signature(fn).parameters
    return jax.jit(fn, static_argnames=[n for n in ("bits", "group_size", "soft") if n in params])


def check_bits(bits) -> int:
    """Bit width as an int in [2, 8], else ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def round_ste(x: Array) -> Array:
    """Round half to even; gradient identity."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def clip_ste(x: Array, lo, hi) -> Array:
    """clip(x, lo, hi); gradient 1 where lo <= x <= hi, else 0 (torch.clamp's rule, boundaries included)."""
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, lo, hi)))


def _split_last(x: Array, group: int) -> Array:
    """[..., C] -> [..., C // group, group]."""
    c = x.shape[-1]
    if c % group:
        raise ValueError(f"last axis ({c}) is not a multiple of the group size {group}")
    return einops.rearrange(x, "... (g s) -> ... g s", s=group)


def _minmax_fake_quant(x: Array, bits: int, axes) -> Array:
    """Dynamic asymmetric min-max over `axes`: zero point −round(m/Δ), not clipped."""
    n = 2 ** bits
    hi = jnp.max(x, axis=axes, keepdims=True)
    lo = jnp.min(x, axis=axes, keepdims=True)
    delta = jnp.maximum((hi - lo) / (n - 1), EPS)
    zero_point = jax.lax.stop_gradient(-jnp.round(lo / delta))
    q = clip_ste(round_ste(x / delta) + zero_point, 0, n - 1)
    return (q - zero_point) * delta


# ---------------------------------------------------------------------------------------------------------------
# Granularity rules (§1)
# ---------------------------------------------------------------------------------------------------------------
def weight_group_size(bits: int, in_features: int) -> Optional[int]:
    """Input channels per weight group: None (per output channel) at ≥6 bits or when in_features % 128 ≠ 0."""
    check_bits(bits)
    if bits >= GROUP_MIN_BITS or in_features % WEIGHT_GROUP:
        return None
    return WEIGHT_GROUP


def act_group_size(bits: int, in_features: int) -> Optional[int]:
    """Channels per activation group of a Linear input: None (per token) at ≥6 bits or in_features % 128 ≠ 0."""
    check_bits(bits)
    if bits >= GROUP_MIN_BITS or in_features % WEIGHT_GROUP:
        return None
    return ACT_GROUP


# ---------------------------------------------------------------------------------------------------------------
# Weights: static min-max parameters (§2.1)
# ---------------------------------------------------------------------------------------------------------------
def _group_kernel(kernel: Array, delta: Array) -> Array:
    """A [in, out] kernel in the layout of its parameters: unchanged for [1, out], [G, in/G, out] for [G, 1, out]."""
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be [in, out], got shape {kernel.shape}")
    if delta.ndim == 2:
        return kernel
    if delta.ndim == 3 and kernel.shape[0] % delta.shape[0] == 0:
        return kernel.reshape(delta.shape[0], kernel.shape[0] // delta.shape[0], kernel.shape[1])
    raise ValueError(f"quantization parameters of shape {delta.shape} do not fit a kernel of shape {kernel.shape}")


@_jit_bits
def weight_minmax_params(kernel: Array, bits: int, group_size: Optional[int] = None) -> Tuple[Array, Array]:
    """(delta, zero_point) of a [in, out] kernel: [1, out] per output channel, or [in/g, 1, out] per
    (group of g input channels, output channel). Constants: gradients do not flow into them."""
    check_bits(bits)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be [in, out], got shape {kernel.shape}")
    kernel = jax.lax.stop_gradient(kernel.astype(jnp.float32))
    if group_size is None:
        grouped, axis = kernel, 0
    else:
        if group_size <= 0 or kernel.shape[0] % group_size:
            raise ValueError(f"in_features {kernel.shape[0]} is not a multiple of group_size {group_size}")
        grouped, axis = kernel.reshape(-1, group_size, kernel.shape[1]), 1
    n = 2 ** bits
    lo = jnp.min(grouped, axis=axis, keepdims=True)
    hi = jnp.max(grouped, axis=axis, keepdims=True)
    delta = jnp.maximum((hi - lo) / (n - 1), EPS)
    zero_point = jnp.clip(jnp.round(-lo / delta), 0, n - 1)
    return delta, zero_point


@_jit_bits
def fake_quant_weight(kernel: Array, delta: Array, zero_point: Array, bits: int) -> Array:
    """Round-to-nearest fake quant of a [in, out] kernel with given parameters; STE gradient to the kernel."""
    check_bits(bits)
    n = 2 ** bits
    grouped = _group_kernel(kernel.astype(jnp.float32), delta)
    q = clip_ste(round_ste(grouped / delta) + zero_point, 0, n - 1)
    return ((q - zero_point) * delta).reshape(kernel.shape)


@_jit_bits
def quantize_weight(kernel: Array, bits: int, group_size: Optional[int] = None) -> Array:
    """Min-max parameters and fake quant in one call."""
    delta, zero_point = weight_minmax_params(kernel, bits, group_size)
    return fake_quant_weight(kernel, delta, zero_point, bits)


# ---------------------------------------------------------------------------------------------------------------
# Activations: dynamic, per token over the last axis (§2.2, §2.3)
# ---------------------------------------------------------------------------------------------------------------
@_jit_bits
def quantize_act_per_token(x: Array, bits: int) -> Array:
    """Asymmetric min-max over the last axis (channels), one range per token."""
    check_bits(bits)
    return _minmax_fake_quant(x.astype(jnp.float32), bits, -1)


@_jit_bits
def quantize_act_per_group(x: Array, bits: int, group_size: int = ACT_GROUP) -> Array:
    """Asymmetric min-max per token and group of `group_size` consecutive channels."""
    check_bits(bits)
    grouped = _split_last(x.astype(jnp.float32), group_size)
    return _minmax_fake_quant(grouped, bits, -1).reshape(x.shape)


@_jit_bits
def quantize_act_signed_split(x: Array, bits: int, group_size: Optional[int] = None) -> Array:
    """fc2 input: negatives on [1−n/2, 0]·Δ₋ and positives on [0, n/2−1]·Δ₊, ranges per token (or token-group).

    The official grouped variant skips the clip; it cannot bind, since |x/Δ| ≤ n/2−1 by construction of Δ₋, Δ₊
    (and of the 1e-6 floor), so one clipped implementation reproduces both.
    """
    check_bits(bits)
    xf = x.astype(jnp.float32)
    if group_size is not None:
        xf = _split_last(xf, group_size)
    half = 2 ** bits / 2 - 1
    hi = jnp.max(xf, axis=-1, keepdims=True)
    lo = jnp.min(xf, axis=-1, keepdims=True)
    delta_neg = jnp.maximum(-lo / half, EPS)
    delta_pos = jnp.maximum(hi / half, EPS)
    x_neg = jnp.where(xf <= 0, xf, 0.0)
    x_pos = jnp.where(xf > 0, xf, 0.0)
    q_neg = clip_ste(round_ste(x_neg / delta_neg), -half, 0)
    q_pos = clip_ste(round_ste(x_pos / delta_pos), 0, half)
    return (q_neg * delta_neg + q_pos * delta_pos).reshape(x.shape)


def act_quantizer(bits: int, in_features: int, signed_split: bool = False) -> Callable[[Array], Array]:
    """The dynamic quantizer of a Linear input (signed_split for fc2), chosen by the rule of §1."""
    group = act_group_size(bits, in_features)
    if signed_split:
        return lambda x: quantize_act_signed_split(x, bits, group)
    if group is None:
        return lambda x: quantize_act_per_token(x, bits)
    return lambda x: quantize_act_per_group(x, bits, group)


# ---------------------------------------------------------------------------------------------------------------
# Attention operands: QKᵀ (matmul1) and the softmax / V of A·V (matmul2)
# ---------------------------------------------------------------------------------------------------------------
@_jit_bits
def quantize_q_operand(q: Array, bits: int) -> Array:
    """Q (already × softmax scale) [..., D]: per token over head_dim at ≥6 bits, groups of 64 below (for
    head_dim ≤ 64 one group is the whole head, so per token: narrow models such as the research default's)."""
    if check_bits(bits) >= GROUP_MIN_BITS or q.shape[-1] <= ACT_GROUP:
        return quantize_act_per_token(q, bits)
    return quantize_act_per_group(q, bits, ACT_GROUP)


@_jit_bits
def quantize_k_operand(k: Array, bits: int) -> Array:
    """K [B, S, H, D]: per (batch, head, channel) over the tokens at ≥6 bits; per (batch, token, head) over
    groups of 64 channels below (per (batch, token, head) over head_dim when head_dim ≤ 64)."""
    if k.ndim != 4:
        raise ValueError(f"k must be [B, S, H, D], got shape {k.shape}")
    if check_bits(bits) >= GROUP_MIN_BITS:
        return _minmax_fake_quant(k.astype(jnp.float32), bits, 1)
    if k.shape[-1] <= ACT_GROUP:
        return quantize_act_per_token(k, bits)
    return quantize_act_per_group(k, bits, ACT_GROUP)


@_jit_bits
def quantize_log2(p: Array, bits: int) -> Array:
    """Log2 quantizer of softmax rows (last axis): Δ·2^−q with Δ the row max; codes ≥ 2^bits become 0."""
    n = 2 ** check_bits(bits)
    pf = p.astype(jnp.float32)
    delta = jnp.maximum(jnp.max(pf, axis=-1, keepdims=True), EPS)
    code = round_ste(-jnp.log2(pf / delta + 1e-20))
    deq = delta * jnp.exp2(-clip_ste(code, 0, n - 1))
    return jnp.where(code >= n, 0.0, deq)


@_jit_bits
def shift_orders(attn_mean: Array, theta) -> Array:
    """Shift-and-sum order clip(ceil(log2(ā/θ)), 0, 3) as int32, written as [ā>θ] + [ā>2θ] + [ā>4θ]. In float32
    fl(ā/θ) > 2^j iff ā > θ·2^j (an exact product), so this equals the reference's ceil(log2(ā/θ)) wherever its
    log2 is correctly rounded, and the θ search can use sorted thresholds."""
    a = jnp.asarray(attn_mean, jnp.float32)
    t = jnp.asarray(theta, jnp.float32)
    return sum((a > t * 2.0 ** j).astype(jnp.int32) for j in range(MAX_ORDER))


@_jit_bits
def quantize_v_shift_and_sum(v: Array, orders: Array, bits: int) -> Array:
    """V [B, S, H, D] with one (Δ, zp) per (batch, head) over all tokens and channels; token j of order k ≥ 1
    takes the mean of 2^k roundings shifted by (2i+1)/2^(k+1), i = −2^(k−1)…2^(k−1)−1, before clip and
    dequant. `orders` [B, S, H] (values outside 0..3 are clipped)."""
    n = 2 ** check_bits(bits)
    if v.ndim != 4 or orders.shape != v.shape[:3]:
        raise ValueError(f"v must be [B, S, H, D] and orders [B, S, H]; got {v.shape} and {orders.shape}")
    vf = v.astype(jnp.float32)
    hi = jnp.max(vf, axis=(1, 3), keepdims=True)
    lo = jnp.min(vf, axis=(1, 3), keepdims=True)
    delta = jnp.maximum((hi - lo) / (n - 1), EPS)
    zero_point = jax.lax.stop_gradient(-jnp.round(lo / delta))
    scaled = vf / delta
    order = jnp.clip(orders, 0, MAX_ORDER)[..., None]
    code = round_ste(scaled)
    for k in range(1, MAX_ORDER + 1):
        copies = 2 ** k
        shifted = sum(round_ste(scaled + (2 * i + 1) / (2 * copies)) for i in range(-copies // 2, copies // 2))
        code = jnp.where(order == k, shifted / copies, code)
    q = clip_ste(code + zero_point, 0, n - 1)
    return (q - zero_point) * delta


# ---------------------------------------------------------------------------------------------------------------
# AdaRound, learned hard sigmoid (§2.6)
# ---------------------------------------------------------------------------------------------------------------
@_jit_bits
def adaround_init_alpha(kernel: Array, delta: Array) -> Array:
    """α [in, out] with h(α) = frac(w/Δ), so soft rounding starts at the float weight."""
    grouped = _group_kernel(kernel.astype(jnp.float32), delta)
    scaled = grouped / delta
    rest = scaled - jnp.floor(scaled)
    alpha = -jnp.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)
    return alpha.reshape(kernel.shape)


@_jit_bits
def adaround_soft(alpha: Array) -> Array:
    """h(α) = clip(sigmoid(α)·(ζ−γ) + γ, 0, 1): the relaxed rounding offset in [0, 1]."""
    return clip_ste(jax.nn.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


@_jit_bits
def adaround_weight(kernel: Array, alpha: Array, delta: Array, zero_point: Array, bits: int,
                    soft: bool = False) -> Array:
    """(clip(floor(w/Δ) + h + zp, 0, n−1) − zp)·Δ with h = h(α) (soft, for optimisation) or 1[α ≥ 0] (hard)."""
    n = 2 ** check_bits(bits)
    if alpha.shape != kernel.shape:
        raise ValueError(f"alpha shape {alpha.shape} must equal the kernel shape {kernel.shape}")
    grouped = _group_kernel(jax.lax.stop_gradient(kernel.astype(jnp.float32)), delta)
    alpha = alpha.reshape(grouped.shape)
    offset = adaround_soft(alpha) if soft else (alpha >= 0).astype(jnp.float32)
    q = clip_ste(jnp.floor(grouped / delta) + offset + zero_point, 0, n - 1)
    return ((q - zero_point) * delta).reshape(kernel.shape)


@_jit_bits
def adaround_regularizer(alpha: Array, beta) -> Array:
    """Σ(1 − |2h(α) − 1|^β): pushes every h to 0 or 1 as β anneals from 20 to 2."""
    h = adaround_soft(alpha)
    return jnp.sum(1.0 - jnp.abs(2.0 * (h - 0.5)) ** beta)
