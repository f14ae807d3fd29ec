"""The multi-scale VQVAE of VAR in Flax (NHWC): CNN encoder/decoder and the residual quantizer with Phi convs.

Numerics follow the official PyTorch modules: GroupNorm(32, eps 1e-6) with two-pass variance, SiLU, a
right/bottom-padded stride-2 downsample, nearest ×2 upsample, single-head spatial attention with a fused qkv
conv, and PyTorch-exact bicubic/area resizes inside the quantizer (`resize.py`).
"""
import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.models.resize import resize

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Settings of the VQVAE; the released `vae_ch160v4096z32.pth` is the default."""
    vocab_size: int = 4096
    z_channels: int = 32            # Cvae: latent and codebook dimension
    ch: int = 160
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    share_quant_resi: int = 4       # 0: one Phi per scale, 1: one shared Phi, K: K partially shared Phis
    quant_resi: float = 0.5
    beta: float = 0.25              # commitment weight (training only)
    using_sa: bool = True
    using_mid_sa: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @property
    def num_phis(self) -> int:
        if abs(self.quant_resi) <= 1e-6:
            return 0
        return {0: len(self.patch_nums), 1: 1}.get(self.share_quant_resi, self.share_quant_resi)

    def phi_index(self, si: int) -> int:
        """The tick rule of the official PhiPartiallyShared/PhiNonShared, evaluated in float64 like NumPy there."""
        k = self.num_phis
        if k <= 1:
            return 0
        sn = len(self.patch_nums)
        if k == 4:
            ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
        else:
            ticks = np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
        return int(np.argmin(np.abs(ticks - si / (sn - 1))))


def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1, padding=None) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class GroupNorm(nn.Module):
    """GroupNorm(32, eps=1e-6) with float32 two-pass statistics, as torch computes them."""
    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        g = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = g.mean(axes, keepdims=True)
        var = jnp.square(g - mean).mean(axes, keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (g.reshape(xf.shape) * scale + bias).astype(x.dtype)


class ResnetBlock(nn.Module):
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(GroupNorm(name="norm1")(x)))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(GroupNorm(name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head attention over the H·W positions; qkv channels are split [q | k | v]."""
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        qkv = _conv(3 * c, 1, "qkv", self.dtype)(GroupNorm(name="norm")(x)).reshape(b, h * w, 3, c)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", attn, v).reshape(b, h, w, c)
        return x + _conv(c, 1, "proj_out", self.dtype)(out)


class Encoder(nn.Module):
    cfg: VQVAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, n_levels = self.cfg, len(self.cfg.ch_mult)
        h = _conv(cfg.ch, 3, "conv_in", self.dtype)(x.astype(self.dtype))
        for i, mult in enumerate(cfg.ch_mult):
            for j in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg.ch * mult, self.dtype, name=f"down_{i}_block_{j}")(h)
                if i == n_levels - 1 and cfg.using_sa:
                    h = AttnBlock(self.dtype, name=f"down_{i}_attn_{j}")(h)
            if i != n_levels - 1:
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = _conv(h.shape[-1], 3, f"down_{i}_downsample", self.dtype, stride=2, padding="VALID")(h)
        c = h.shape[-1]
        h = ResnetBlock(c, self.dtype, name="mid_block_1")(h)
        if cfg.using_mid_sa:
            h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(c, self.dtype, name="mid_block_2")(h)
        h = nn.silu(GroupNorm(name="norm_out")(h))
        return _conv(cfg.z_channels, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    cfg: VQVAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, n_levels = self.cfg, len(self.cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        h = _conv(c, 3, "conv_in", self.dtype)(z.astype(self.dtype))
        h = ResnetBlock(c, self.dtype, name="mid_block_1")(h)
        if cfg.using_mid_sa:
            h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(c, self.dtype, name="mid_block_2")(h)
        for i in reversed(range(n_levels)):
            for j in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg.ch * cfg.ch_mult[i], self.dtype, name=f"up_{i}_block_{j}")(h)
                if i == n_levels - 1 and cfg.using_sa:
                    h = AttnBlock(self.dtype, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _conv(h.shape[-1], 3, f"up_{i}_upsample", self.dtype)(h)
        h = nn.silu(GroupNorm(name="norm_out")(h))
        return _conv(cfg.in_channels, 3, "conv_out", self.dtype)(h)


class VQVAE(nn.Module):
    """Encoder → quant_conv → multi-scale residual quantizer → post_quant_conv → decoder.

    Images are NHWC in [-1, 1]; latents f / f̂ are NHWC [B, pn_last, pn_last, Cvae] and stay float32; token maps
    are lists (one per scale) of int32 [B, pn²] in row-major order, as the official `idx_Bl` lists.
    """
    cfg: VQVAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        self.quant_conv = _conv(cfg.z_channels, 3, "quant_conv", jnp.float32)
        self.post_quant_conv = _conv(cfg.z_channels, 3, "post_quant_conv", jnp.float32)
        self.embedding = self.param("embedding", nn.initializers.uniform(1.0 / cfg.vocab_size),
                                    (cfg.vocab_size, cfg.z_channels), jnp.float32)
        self.phis = [_conv(cfg.z_channels, 3, f"phi_{k}", jnp.float32) for k in range(cfg.num_phis)]

    def __call__(self, img: Array) -> Array:
        """Reconstruction through the full token pyramid (also initialises every parameter)."""
        return self.fhat_to_img(self.tokenize(self.encode(img))[1][-1])

    # --- pieces ------------------------------------------------------------------------------------------------
    def encode(self, img: Array) -> Array:
        return self.quant_conv(self.encoder(img).astype(jnp.float32))

    def fhat_to_img(self, f_hat: Array) -> Array:
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat)).astype(jnp.float32), -1.0, 1.0)

    def phi(self, si: int, h: Array) -> Array:
        if not self.phis:
            return h
        r = abs(self.cfg.quant_resi)
        return h * (1 - r) + self.phis[self.cfg.phi_index(si)](h) * r

    def embed(self, idx: Array) -> Array:
        return jnp.take(self.embedding, idx, axis=0)

    def _upsample_phi(self, si: int, h: Array) -> Array:
        """h [B, pn, pn, C] → Phi(bicubic_up(h)) at the last scale's size (no resize at the last scale)."""
        return self.phi(si, resize(h, self.cfg.patch_nums[-1], "bicubic"))

    # --- tokenisation ------------------------------------------------------------------------------------------
    def nearest_code(self, z: Array) -> Array:
        """argmin_v ‖z − e_v‖² as ‖z‖² + ‖e_v‖² − 2 z·e_v (the official formula), over the last axis."""
        e = self.embedding
        d = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)
             - 2 * jnp.einsum("...c,vc->...v", z, e, precision="highest"))
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    def tokenize(self, f: Array):
        """f → (token maps per scale, cumulative f̂ per scale): the official `f_to_idxBl_or_fhat`."""
        pns, sn = self.cfg.patch_nums, len(self.cfg.patch_nums)
        f_rest, f_hat = f.astype(jnp.float32), jnp.zeros_like(f, jnp.float32)
        idx_list, fhat_list = [], []
        for si, pn in enumerate(pns):
            z = resize(f_rest, pn, "area") if si != sn - 1 else f_rest
            idx = self.nearest_code(z)
            h = self._upsample_phi(si, self.embed(idx))
            f_hat, f_rest = f_hat + h, f_rest - h
            idx_list.append(idx.reshape(idx.shape[0], pn * pn))
            fhat_list.append(f_hat)
        return idx_list, fhat_list

    def quantize_train(self, f: Array):
        """The quantizer's training forward (official `VectorQuantizer2.forward`), float32.

        Returns (f̂ with straight-through gradient f + sg(f̂ − f), vq loss, token maps per scale, and the
        quantizer inputs per scale [B, pn, pn, C] (for re-initialising dead codes)). The loss is the mean over
        scales of β·MSE(sg(f̂_k), f) (commitment, to the encoder) + MSE(f̂_k, sg(f)) (to codebook and Phi).
        """
        pns, sn = self.cfg.patch_nums, len(self.cfg.patch_nums)
        f = f.astype(jnp.float32)
        f_no_grad = jax.lax.stop_gradient(f)
        f_rest, f_hat = f_no_grad, jnp.zeros_like(f_no_grad)
        vq_loss, idx_list, inputs = 0.0, [], []
        for si, pn in enumerate(pns):
            z = resize(f_rest, pn, "area") if si != sn - 1 else f_rest
            z = jax.lax.stop_gradient(z)
            idx = self.nearest_code(z)
            h = self._upsample_phi(si, self.embed(idx))
            f_hat, f_rest = f_hat + h, f_rest - h
            vq_loss = vq_loss + self.cfg.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f)) \
                + jnp.mean(jnp.square(f_hat - f_no_grad))
            idx_list.append(idx.reshape(idx.shape[0], pn * pn))
            inputs.append(z)
        f_hat_st = (jax.lax.stop_gradient(f_hat) - f_no_grad) + f
        return f_hat_st, vq_loss / sn, idx_list, inputs

    def img_to_idx(self, img: Array):
        return self.tokenize(self.encode(img))[0]

    def idx_to_fhat(self, idx_list: Sequence[Array]) -> Array:
        """Token maps → final f̂ (`embed_to_fhat` with all_to_max_scale)."""
        f_hat = 0.0
        for si, idx in enumerate(idx_list):
            pn = self.cfg.patch_nums[si]
            f_hat = f_hat + self._upsample_phi(si, self.embed(idx.reshape(idx.shape[0], pn, pn)))
        return f_hat

    def idx_to_img(self, idx_list: Sequence[Array]) -> Array:
        return self.fhat_to_img(self.idx_to_fhat(idx_list))

    # --- VAR inputs --------------------------------------------------------------------------------------------
    def next_scale_input(self, si: int, f_hat: Array, h: Array):
        """Adds scale si's embeddings h [B, pn, pn, C] to f̂; returns (f̂, the area-downsampled next input)."""
        pns = self.cfg.patch_nums
        f_hat = f_hat + self._upsample_phi(si, h.astype(jnp.float32))
        if si == len(pns) - 1:
            return f_hat, f_hat
        return f_hat, resize(f_hat, pns[si + 1], "area")

    def idx_to_var_input(self, idx_list: Sequence[Array]) -> Array:
        """Teacher-forcing input [B, L − pn₀², Cvae] (`idxBl_to_var_input`)."""
        pns = self.cfg.patch_nums
        b = idx_list[0].shape[0]
        f_hat = jnp.zeros((b, pns[-1], pns[-1], self.cfg.z_channels), jnp.float32)
        blocks = []
        for si in range(len(pns) - 1):
            h = self.embed(idx_list[si].reshape(b, pns[si], pns[si]))
            f_hat, nxt = self.next_scale_input(si, f_hat, h)
            blocks.append(nxt.reshape(b, -1, self.cfg.z_channels))
        return jnp.concatenate(blocks, axis=1)
