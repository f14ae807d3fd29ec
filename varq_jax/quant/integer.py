"""Integer execution of a quantized Linear: integer codes in, int32 products, scales in the epilogue.

With activation codes per token (or per group) ẋ = (a − zₐ)·Δₐ and weight codes ŵ = (w − z_w)·Δ_w the product is

    Σᵢ ẋᵢ ŵᵢₒ = Σ_b Δₐ[b] · (Δ_w[b, o] · J_b − zₐ[b] · T_b[o]),   J_b = Σ_{i∈b} a'ᵢ w'ᵢₒ − z'_w[b, o] · R_b

over the K-blocks b on which both scales are constant, with the codes stored centred (a' = a − 2^(bits−1) fits
int8, w' likewise; z' the centred zero points), R_b = Σ_{i∈b} a'ᵢ the row sums made with the codes and
T_b[o] = Δ_w[b, o] · Σ_{i∈b} (w − z_w) the column sums stored with the weights. J_b is exact in int32 (|J_b| <
2·128²·K), so the result equals the fake-quant simulation up to the float rounding of the epilogue. fc2's signed
split is two such products (negative and positive codes, each with its own Δ, zero point 0) sharing the weights.

Weight form of a Linear (its 'quant' variables in integer execution): 'codes' (int8 [K, N]; at ≤ 4 bits two codes
per byte, int8 [K/2, N]: in each chunk of `kt` rows, byte r holds row r in its low and row r + kt/2 in its high
nibble), 'scale' (Δ_w float32 [G, N]), 'zero' (z'_w int8 [G, N]) and 'bsum' (Σ_{i∈b}(w − z_w), int16/int32
[nb, N]). `plan(rule, K)` fixes the K-blocks from the site's rule, so conversion and execution agree.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.quant import quantizers

Array = jax.Array
CODERS = ("per_token", "per_group", "signed_split")    # activation quantizers with an integer form
MAX_CHUNK = 128                                          # rows per packed chunk / kernel K step


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one Linear runs in integers: K-blocks of constant scales, the weight group, the packing chunk."""
    in_features: int
    w_bits: int
    w_group: int            # input channels per weight scale (in_features: per output channel)
    a_bits: int
    a_group: int            # input channels per activation scale (in_features: per token)
    coder: str              # per_token | per_group | signed_split

    @property
    def block(self) -> int:
        """K-block on which both scales are constant."""
        return min(self.w_group, self.a_group)

    @property
    def num_blocks(self) -> int:
        return self.in_features // self.block

    @property
    def packed(self) -> bool:
        return self.w_bits <= 4

    @property
    def chunk(self) -> int:
        """Rows per K step of the kernel and per packed chunk: the block, or 128 of a long per-channel block."""
        b = self.block
        return MAX_CHUNK if b > MAX_CHUNK and b % MAX_CHUNK == 0 else b

    @property
    def bsum_dtype(self):
        return jnp.int16 if self.block * (2 ** self.w_bits - 1) < 2 ** 15 else jnp.int32


def plan(rule, site: str, in_features: int, where: str = "") -> Plan:
    """The integer plan of a Linear under its resolved rule; ValueError where integers cannot run it."""
    where = where or site
    if not rule.weights:
        raise ValueError(f"integer execution of {where}: its inputs are quantized but its weights are not; "
                         f"integer GEMMs need both (keep the site in full precision or run the simulation)")
    name, a_group = rule.act_spec(site, in_features)
    if name not in CODERS:
        raise ValueError(f"integer execution of {where}: activation quantizer {name!r} has no integer form "
                         f"(integer execution knows {', '.join(CODERS)}); run it with the simulation")
    w_group = rule.weight_group(in_features) or in_features
    a_group = a_group or in_features
    if max(w_group, a_group) % min(w_group, a_group):
        raise ValueError(f"integer execution of {where}: the weight groups ({w_group}) and activation groups "
                         f"({a_group}) do not nest, so no K-block has constant scales")
    p = Plan(in_features, rule.w_bits, w_group, rule.a_bits, a_group, name)
    if p.packed and p.chunk % 2:
        raise ValueError(f"integer execution of {where}: {p.w_bits}-bit codes are packed two per byte in chunks "
                         f"of {p.chunk} input channels, which must be even")
    return p


def weight_plan(rule, in_features: int) -> Plan:
    """The plan of a weight-only site (inputs in float): the activation side is one block."""
    w_group = rule.weight_group(in_features) or in_features
    return Plan(in_features, rule.w_bits, w_group, 8, in_features, "per_token")


# --- weights ------------------------------------------------------------------------------------------------------
def pack(centred: Array, chunk: int) -> Array:
    """int8 [K, N] codes in [−8, 7] → int8 [K/2, N], two per byte within chunks of `chunk` rows (module doc)."""
    k, n = centred.shape
    c = centred.astype(jnp.int8).reshape(k // chunk, 2, chunk // 2, n)
    lo, hi = c[:, 0], c[:, 1]
    byte = jnp.bitwise_or(jnp.bitwise_and(lo, jnp.int8(0x0F)), jnp.left_shift(hi, jnp.int8(4)))
    return byte.reshape(k // 2, n)


def unpack(packed: Array, chunk: int) -> Array:
    """Inverse of `pack`: sign-extended nibbles, int8 [K, N]."""
    half, n = packed.shape[0], packed.shape[1]
    p = packed.reshape(-1, chunk // 2, n)
    lo = jax.lax.shift_right_arithmetic(jnp.left_shift(p, jnp.int8(4)), jnp.int8(4))
    hi = jax.lax.shift_right_arithmetic(p, jnp.int8(4))
    return jnp.stack([lo, hi], axis=1).reshape(2 * half, n)


def weight_codes(p: Plan, codes: Array) -> Array:
    """The stored codes as int8 [K, N], centred."""
    return unpack(codes, p.chunk) if p.packed else codes


def weight_form(p: Plan, codes: Array, delta: Array, zero_point: Array) -> dict:
    """The integer form of a Linear from its uint codes q ∈ [0, 2^bits) [K, N] and grid (Δ, z) ([1, N] or [G, 1, N])."""
    k, n = codes.shape
    if k != p.in_features:
        raise ValueError(f"codes have {k} input channels, the plan {p.in_features}")
    c = 2 ** (p.w_bits - 1)
    groups = k // p.w_group
    scale = jnp.asarray(delta, jnp.float32).reshape(groups, n)
    zp = jnp.asarray(zero_point, jnp.float32).reshape(groups, n).astype(jnp.int32)
    q = jnp.asarray(codes).astype(jnp.int32)
    per_block = q.reshape(p.num_blocks, p.block, n).sum(1) - p.block * jnp.repeat(zp, p.w_group // p.block, 0)
    centred = (q - c).astype(jnp.int8)
    return {"codes": pack(centred, p.chunk) if p.packed else centred, "scale": scale,
            "zero": (zp - c).astype(jnp.int8), "bsum": per_block.astype(p.bsum_dtype)}


def dequantize(p: Plan, w: dict) -> Array:
    """ŵ float32 [K, N] of a weight form, computed as the simulation does: (q − z)·Δ per group."""
    q = weight_codes(p, w["codes"]).astype(jnp.float32)
    k, n = q.shape
    g = q.reshape(k // p.w_group, p.w_group, n)
    return ((g - w["zero"].astype(jnp.float32)[:, None]) * w["scale"][:, None]).reshape(k, n)


def weight_bytes(w: dict) -> int:
    """Bytes of a flat dict of arrays as held in memory (a weight form: codes + scales + zero points + sums)."""
    return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in w.values()))


# --- activations --------------------------------------------------------------------------------------------------
def act_codes(p: Plan, x: Array):
    """(codes int8 [S, M, K], scale float32 [S, M, nbₐ], zero float32 [S, M, nbₐ], row sums int32 [S, M, nb]) of
    inputs x [M, K] — the codes of the simulation's quantizer (`quantizers`), centred, and their sums per K-block
    (made in the same pass); S = 2 for the signed split (negative, positive parts)."""
    codes, scale, zero = _act_codes(p, x)
    s, m, k = codes.shape
    rows = jnp.sum(codes.reshape(s, m, p.num_blocks, p.block).astype(jnp.int32), -1)
    return codes, scale, zero, rows


def act_codes_with(p: Plan, x: Array, act: str = "xla", interpret: bool = False):
    """`act_codes` made by XLA (act 'xla') or by the one-pass Pallas kernel (act 'pallas', `act_kernel`)."""
    if act == "pallas":
        from varq_jax.quant import act_kernel
        return act_kernel.act_codes(p, x, interpret=interpret)
    return act_codes(p, x)


def _act_codes(p: Plan, x: Array):
    n = 2 ** p.a_bits
    xf = x.astype(jnp.float32)
    m, k = xf.shape
    g = xf.reshape(m, k // p.a_group, p.a_group)
    if p.coder == "signed_split":
        half = n / 2 - 1
        hi, lo = jnp.max(g, -1, keepdims=True), jnp.min(g, -1, keepdims=True)
        d_neg, d_pos = jnp.maximum(-lo / half, quantizers.EPS), jnp.maximum(hi / half, quantizers.EPS)
        q_neg = jnp.clip(jnp.round(jnp.where(g <= 0, g, 0.0) / d_neg), -half, 0)
        q_pos = jnp.clip(jnp.round(jnp.where(g > 0, g, 0.0) / d_pos), 0, half)
        codes = jnp.stack([q_neg, q_pos]).astype(jnp.int8).reshape(2, m, k)
        scale = jnp.stack([d_neg, d_pos])[..., 0]
        return codes, scale, jnp.zeros_like(scale)
    hi, lo = jnp.max(g, -1, keepdims=True), jnp.min(g, -1, keepdims=True)
    delta = jnp.maximum((hi - lo) / (n - 1), quantizers.EPS)
    zp = -jnp.round(lo / delta)
    q = jnp.clip(jnp.round(g / delta) + zp, 0, n - 1)
    c = n // 2
    return (q - c).astype(jnp.int8).reshape(1, m, k), delta[None, ..., 0], (zp - c)[None, ..., 0]


# --- the product ----------------------------------------------------------------------------------------------------
def epilogue_terms(p: Plan, w: dict):
    """Per K-block (Δ_w [nb, N], z'_w int32 [nb, N], T [nb, N]) of a weight form."""
    rep = p.w_group // p.block
    scale = jnp.repeat(w["scale"], rep, 0)
    return scale, jnp.repeat(w["zero"].astype(jnp.int32), rep, 0), scale * w["bsum"].astype(jnp.float32)


def matmul_xla(p: Plan, codes: Array, a_scale: Array, a_zero: Array, rows: Array, w: dict) -> Array:
    """Σᵢ ẋᵢ ŵᵢₒ float32 [M, N] through XLA's integer dot (one int8 GEMM per K-block and part)."""
    s, m, k = codes.shape
    nb = p.num_blocks
    wq = weight_codes(p, w["codes"]).reshape(nb, p.block, -1)
    xb = codes.reshape(s, m, nb, p.block)
    prod = jnp.einsum("smbk,bkn->smbn", xb, wq, preferred_element_type=jnp.int32)
    w_scale, w_zero, t = epilogue_terms(p, w)
    j = prod - w_zero[None, None] * rows[..., None]
    rep = p.a_group // p.block
    a_s = jnp.repeat(a_scale, rep, -1)[..., None]
    a_z = jnp.repeat(a_zero, rep, -1)[..., None]
    return jnp.sum(a_s * (w_scale * j.astype(jnp.float32) - a_z * t), axis=(0, 2))


def dense(p: Plan, x: Array, w: dict, bias: Optional[Array], out_dtype, kernel: str = "xla",
          interpret: bool = False, act: str = "xla") -> Array:
    """A quantized Linear on integer codes: x [..., K] → [..., N] in out_dtype (bias added in float32); `kernel`
    makes the product, `act` the activation codes (xla | pallas: `act_kernel`)."""
    lead = x.shape[:-1]
    with jax.named_scope("act_quant"):
        codes, a_scale, a_zero, rows = act_codes_with(p, x.reshape(-1, x.shape[-1]), act, interpret)
    with jax.named_scope("linear"):
        if kernel == "pallas":
            from varq_jax.quant import int_kernel
            y = int_kernel.matmul(p, codes, a_scale, a_zero, rows, w, bias, out_dtype, interpret=interpret)
        else:
            y = matmul_xla(p, codes, a_scale, a_zero, rows, w)
            y = (y if bias is None else y + bias.astype(jnp.float32)).astype(out_dtype)
    return y.reshape(*lead, -1)
