"""The VAR transformer in Flax: AdaLN blocks, L2-normalised attention, teacher-forced and KV-cached forwards.

Every matmul passes through `policy` (see `policy.py`): `None` is full precision; a quantization policy sees
each Linear (with its site name) and each attention (per scale block, with exactly the keys that the KV-cached
inference would see). The residual stream stays float32; matmuls run in `dtype` (bf16 for speed); logits are
float32.
"""
import dataclasses
import math
from typing import Any, Optional

import flax
import flax.linen as nn
import einops
import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.models import fused_qkv

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """Hyperparameters of a VAR transformer; defaults are VAR-d16 (see `zoo.py` for the released presets)."""
    depth: int = 16
    width: int = 1024
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def begin_ends(self) -> tuple:
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return tuple(out)

    @property
    def attn_scale(self) -> float:
        return 1.0 if self.attn_l2_norm else 0.25 / math.sqrt(self.head_dim)

    def level_ids(self) -> np.ndarray:
        return np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(self.patch_nums)])

    def block_causal_mask(self) -> np.ndarray:
        """[L, L] bool: query i sees key j iff level(j) ≤ level(i) (the official `attn_bias_for_masking`)."""
        lvl = self.level_ids()
        return lvl[:, None] >= lvl[None, :]


def layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm without affine parameters, float32 two-pass statistics."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """torch F.normalize: x / max(‖x‖₂, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def qkv_heads(qkv: Array, q_bias: Array, v_bias: Array, heads: int, head_scale: Optional[Array] = None):
    """The mat_qkv output [..., n, 3C] → q, k, v [..., n, heads, C / heads] float32 with the q/v biases added;
    with head_scale [heads] (attn_l2_norm) q and k are L2-normalised per head and q is scaled per head."""
    qkv = qkv.astype(jnp.float32)
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
    q, k, v = (einops.rearrange(t, "... (h d) -> ... h d", h=heads) for t in jnp.split(qkv, 3, axis=-1))
    if head_scale is not None:
        q = l2_normalize(q) * head_scale[:, None]
        k = l2_normalize(k)
    return q, k, v


def attention(q: Array, k: Array, v: Array, scale: float, mask: Optional[Array] = None,
              kv_len: Optional[int] = None) -> Array:
    """softmax(q·kᵀ·scale [+ mask]) · v with q [B, T, H, D], k/v [B, S, H, D]; logits and softmax in float32.

    kv_len: only keys [0, kv_len) exist (a preallocated cache). On GPU with 16-bit inputs and a head size cuDNN
    takes (a multiple of 8, ≤ 256) this is cuDNN's fused flash attention, which never materialises the
    [B, H, T, S] scores: KV-cached sampling (no mask; the first kv_len keys read in place, a padding mask) and the
    teacher-forced pass under the block-causal mask (training: 1.8× faster steps on an H200; outputs and gradients
    within bf16 rounding of this XLA path, benchmarks/research/check_masked_cudnn.py)."""
    head_dim = q.shape[-1]
    flash_ok = head_dim % 8 == 0 and head_dim <= 256                  # cuDNN's flash attention's head sizes
    if flash_ok and q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu":
        if mask is None:
            lens = None if kv_len in (None, k.shape[1]) else jnp.full((q.shape[0],), kv_len, jnp.int32)
            return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lens,
                                                implementation="cudnn")
        if kv_len is None:
            mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)     # [B|1, H|1, T, S]
            return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation="cudnn")
    if kv_len is not None:
        k, v = k[:, :kv_len], v[:, :kv_len]
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def attend_visible(q: Array, k: Array, v: Array, scale: float, policy_attend=None, kv_len: Optional[int] = None):
    """Attention of q to the keys it may see (the first kv_len, default all): plain `attention`, or a quantization
    policy's (q, k, v) → out on exactly those keys."""
    if policy_attend is None:
        return attention(q, k, v, scale, kv_len=kv_len)
    return policy_attend(q, k[:, :kv_len], v[:, :kv_len])


class Dense(nn.Module):
    """A Linear layer (kernel [in, out]) whose matmul goes through the quantization policy when one is given."""
    features: int
    site: str
    use_bias: bool = True
    dtype: Any = jnp.float32
    out_dtype: Any = None
    policy: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = None       # a policy that holds this Linear's weights itself (integer codes in 'quant')
        if self.policy is None or self.is_initializing() or self.has_variable("params", "kernel"):
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        if self.policy is not None:
            return self.policy.dense(self, x, kernel, bias)
        return dense(x, kernel, bias, self.dtype, self.out_dtype)


def dense(x: Array, kernel: Array, bias: Optional[Array], dtype, out_dtype=None) -> Array:
    """x·W + b with inputs in `dtype`, float32 accumulation, the product and bias in `out_dtype` (default
    `dtype`): as torch autocast's Linear, so a 16-bit GEMM writes 16-bit outputs with the bias in its epilogue."""
    out_dtype = out_dtype or dtype
    # operands of another 16-bit type than the output (fp16 quantized operands in a bf16 program): float32
    # accumulation, then the cast, as fp16 GEMMs have no bf16 output
    acc = out_dtype if jnp.dtype(out_dtype) in (jnp.dtype(dtype), jnp.dtype(jnp.float32)) else jnp.float32
    with jax.named_scope("linear"):          # scopes name the parts of a profile (benchmarks' time breakdown)
        y = jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype),
                       preferred_element_type=acc).astype(out_dtype)
    if bias is not None:
        y = y + bias.astype(out_dtype)
    return y


class SelfAttention(nn.Module):
    cfg: VARConfig
    dtype: Any = jnp.float32
    policy: Any = None

    @nn.compact
    def __call__(self, x: Array, cache: Any = None, start: int = 0):
        """Teacher-forced over all L tokens (cache None), or one KV-cached scale: x holds the tokens at
        positions [start, start + n) and `cache` is a `KVCache` (or `stack.StackedKVCache`); returns (out, cache)."""
        cfg = self.cfg
        b, n, c = x.shape
        h, d = cfg.heads, cfg.head_dim
        w = Dense(3 * c, "mat_qkv", use_bias=False, dtype=self.dtype, policy=self.policy, name="mat_qkv")
        q_bias = self.param("q_bias", nn.initializers.zeros, (c,), jnp.float32)
        v_bias = self.param("v_bias", nn.initializers.zeros, (c,), jnp.float32)
        head_scale = None
        if cfg.attn_l2_norm:
            scale_mul = self.param("scale_mul", nn.initializers.constant(math.log(4.0)), (h,), jnp.float32)
            head_scale = jnp.exp(jnp.minimum(scale_mul, math.log(100.0)))
        qkv = w(x)
        # The unrolled sampler's per-block cache only: the kernel has run on a GPU there, not yet inside lax.scan.
        if (isinstance(cache, KVCache) and head_scale is not None and self.policy is None
                and fused_qkv.supported(qkv, d)):
            q, k, v = fused_qkv.qkv_heads(qkv, q_bias, v_bias, head_scale, h)    # sampling on GPU: one kernel
        else:
            q, k, v = (t.astype(self.dtype) for t in qkv_heads(qkv, q_bias, v_bias, h, head_scale))

        if cache is not None:
            with jax.named_scope("attention"):
                out, cache = cache.attend(q, k, v, start, cfg.attn_scale, self._policy_attend())
        elif self.policy is not None and self.policy.blockwise_attention:
            # Per scale block: queries of scale s see exactly the keys of scales ≤ s, as in KV-cached inference.
            out = jnp.concatenate([self._attend(q[:, s:e], k[:, :e], v[:, :e]) for s, e in cfg.begin_ends], 1)
        else:
            out = attention(q, k, v, cfg.attn_scale, jnp.asarray(cfg.block_causal_mask()))
        out = einops.rearrange(out, "b n h d -> b n (h d)")
        return Dense(c, "proj", dtype=self.dtype, policy=self.policy, name="proj")(out), cache

    def _attend(self, q, k, v):
        return attend_visible(q, k, v, self.cfg.attn_scale, self._policy_attend())

    def _policy_attend(self):
        """The quantization policy's attention on (q, visible k, visible v), or None for plain attention."""
        if self.policy is None:
            return None
        return lambda q, k, v: self.policy.attention(self, q, k, v, self.cfg.attn_scale)


class FFN(nn.Module):
    cfg: VARConfig
    dtype: Any = jnp.float32
    policy: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = Dense(self.cfg.hidden, "fc1", dtype=self.dtype, policy=self.policy, name="fc1")(x)
        h = nn.gelu(h, approximate=True)
        return Dense(self.cfg.width, "fc2", dtype=self.dtype, policy=self.policy, name="fc2")(h)


class AdaLNBlock(nn.Module):
    """x += γ₁·Attn(LN(x)(1+s₁)+b₁); x += γ₂·FFN(LN(x)(1+s₂)+b₂); chunks γ₁ γ₂ s₁ s₂ b₁ b₂.

    `modulation(cond)` gives the six chunks; they depend on the class only, so the sampler computes them once
    per image and passes them to `modulated` at every scale (`__call__` does both)."""
    cfg: VARConfig
    dtype: Any = jnp.float32
    policy: Any = None

    def setup(self):
        cfg, c = self.cfg, self.cfg.width
        if cfg.shared_aln:
            self.ada_gss = self.param("ada_gss", nn.initializers.normal(c ** -0.5), (6, c), jnp.float32)
        else:
            self.ada_lin = Dense(6 * c, "ada_lin", dtype=self.dtype, policy=self.policy)
        self.attn = SelfAttention(cfg, self.dtype, self.policy)
        self.ffn = FFN(cfg, self.dtype, self.policy)

    def modulation(self, cond: Array) -> Array:
        """[B, 6, C] float32 from the block condition (the shared [B, 6, C] projection, or the class embedding)."""
        if self.cfg.shared_aln:
            return self.ada_gss + cond.astype(jnp.float32)
        return self.ada_lin(nn.silu(cond)).astype(jnp.float32).reshape(-1, 6, self.cfg.width)

    def modulated(self, x: Array, six: Array, cache=None, start: int = 0):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (six[:, None, i] for i in range(6))
        ln = lambda t: layer_norm(t, self.cfg.norm_eps)
        a, cache = self.attn((ln(x) * (1 + scale1) + shift1).astype(self.dtype), cache, start)
        x = x + a.astype(jnp.float32) * gamma1
        f = self.ffn((ln(x) * (1 + scale2) + shift2).astype(self.dtype))
        x = x + f.astype(jnp.float32) * gamma2
        return x, cache

    def __call__(self, x: Array, cond: Array, cache=None, start: int = 0):
        return self.modulated(x, self.modulation(cond), cache, start)


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    Methods: `__call__` (teacher-forced logits); the sampler composes `condition`, `first_tokens`,
    `block_modulations`, `cached_blocks` (one KV-cached scale), `logits` and `embed_next`; `init_cache` allocates
    the cache.
    """
    cfg: VARConfig
    dtype: Any = jnp.float32
    policy: Any = None

    def setup(self):
        cfg, c = self.cfg, self.cfg.width
        std = math.sqrt(1 / c / 3)
        init = nn.initializers.truncated_normal(std)
        self.class_emb = self.param("class_emb", init, (cfg.num_classes + 1, c), jnp.float32)
        self.pos_start = self.param("pos_start", init, (cfg.patch_nums[0] ** 2, c), jnp.float32)
        self.pos_1LC = self.param("pos_1LC", init, (cfg.L, c), jnp.float32)
        self.lvl_embed = self.param("lvl_embed", init, (cfg.num_scales, c), jnp.float32)
        self.word_embed = Dense(c, "word_embed", dtype=self.dtype, out_dtype=jnp.float32, policy=self.policy)
        if cfg.shared_aln:
            self.shared_ada_lin = Dense(6 * c, "shared_ada_lin", dtype=self.dtype, policy=self.policy)
        self.blocks = [AdaLNBlock(cfg, self.dtype, self.policy, name=f"blocks_{i}") for i in range(cfg.depth)]
        self.head_nm = Dense(2 * c, "head_nm", dtype=self.dtype, policy=self.policy)
        self.head = Dense(cfg.vocab_size, "head", dtype=self.dtype, out_dtype=jnp.float32, policy=self.policy)

    # --- pieces shared by the teacher-forced and cached forwards ----------------------------------------------
    def lvl_pos(self) -> Array:
        return self.lvl_embed[jnp.asarray(self.cfg.level_ids())] + self.pos_1LC

    def condition(self, labels: Array) -> Array:
        """Class embedding [B, C] (label num_classes = the null class)."""
        return jnp.take(self.class_emb, labels, axis=0)

    def block_condition(self, cond: Array) -> Array:
        """What each block's AdaLN receives: cond itself, or the shared [B, 6, C] projection."""
        if self.cfg.shared_aln:
            return self.shared_ada_lin(nn.silu(cond)).astype(jnp.float32).reshape(-1, 6, self.cfg.width)
        return cond

    def first_tokens(self, cond: Array) -> Array:
        n0 = self.cfg.patch_nums[0] ** 2
        return cond[:, None] + self.pos_start[None] + self.lvl_pos()[None, :n0]

    def embed_next(self, x_cvae: Array, start: int) -> Array:
        """word_embed of next-scale inputs [B, n, Cvae] placed at positions [start, start + n)."""
        n = x_cvae.shape[1]
        return self.word_embed(x_cvae) + self.lvl_pos()[None, start:start + n]

    def logits(self, x: Array, cond: Array) -> Array:
        ss = self.head_nm(nn.silu(cond)).astype(jnp.float32).reshape(-1, 2, self.cfg.width)
        h = layer_norm(x, self.cfg.norm_eps) * (1 + ss[:, None, 0]) + ss[:, None, 1]
        return self.head(h.astype(self.dtype)).astype(jnp.float32)

    # --- forwards ----------------------------------------------------------------------------------------------
    def embed(self, labels: Array, x_cvae: Array):
        """(the tokens entering block 0 [B, L, C], the class embedding [B, C]) of the teacher-forced forward."""
        cond = self.condition(labels)
        x = jnp.concatenate([self.first_tokens(cond), self.embed_next(x_cvae, self.cfg.patch_nums[0] ** 2)], 1)
        return x, cond

    def __call__(self, labels: Array, x_cvae: Array) -> Array:
        """Teacher-forced logits [B, L, V] from labels [B] and `idx_to_var_input` [B, L − pn₀², Cvae].
        (Class-label dropout for CFG training is applied by the caller, on the labels.)"""
        x, cond = self.embed(labels, x_cvae)
        bc = self.block_condition(cond)
        for blk in self.blocks:
            x, _ = blk(x, bc)
        return self.logits(x, cond)

    def block_modulations(self, cond: Array) -> list:
        """Every block's AdaLN chunks [B, 6, C]: they depend on the class only, so the sampler computes them once."""
        bc = self.block_condition(cond)
        return [blk.modulation(bc) for blk in self.blocks]

    def cached_blocks(self, x: Array, six: list, caches: list, start: int):
        """All blocks on one KV-cached scale: tokens x [B, n, C] at positions [start, start + n) with
        `block_modulations` six → (hidden [B, n, C] float32, caches)."""
        x, new = x.astype(jnp.float32), []
        for blk, m, cache in zip(self.blocks, six, caches):
            x, cache = blk.modulated(x, m, cache, start)
            new.append(cache)
        return x, new


def block_site_paths(cfg: VARConfig) -> list:
    """Paths of a block's matmul sites relative to the block: its Linears and its attention ('attn')."""
    return (["ada_lin"] if not cfg.shared_aln else []) + ["attn/mat_qkv", "attn", "attn/proj", "ffn/fc1", "ffn/fc2"]


@flax.struct.dataclass
class KVCache:
    """One block's preallocated keys and values [B, L, H, D], written in place one scale at a time."""
    k: Array
    v: Array

    def attend(self, q: Array, k: Array, v: Array, start: int, scale: float, policy_attend=None):
        """Writes this scale's k, v at [start, start + n) and attends q to every position < start + n.
        policy_attend(q, k_visible, v_visible) replaces plain attention (quantized models)."""
        k_all = jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), start, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), start, axis=1)
        out = attend_visible(q, k_all, v_all, scale, policy_attend, kv_len=start + q.shape[1])
        return out, KVCache(k_all, v_all)


def init_cache(cfg: VARConfig, batch: int, dtype=jnp.float32) -> list:
    """Preallocated KV cache: a `KVCache` of [batch, L, H, D] buffers per block."""
    shape = (batch, cfg.L, cfg.heads, cfg.head_dim)
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.depth)]
