"""InceptionV3 of the FID variant in Flax (NHWC): the TF `inception-2015-12-05` graph that the ADM evaluator
runs and pytorch-fid ports (weights `pt_inception-2015-12-05-6726825d.pth`, converted by `convert_inception`).

What differs from torchvision's InceptionV3, as in pytorch-fid: 1008 classes, no aux head, the average pools
inside Mixed_5b…7b exclude the zero padding from the mean (TF semantics), and Mixed_7c pools its last branch
with a 3×3 *max* pool. BatchNorm eps is 1e-3. Module names are pytorch-fid's, so the weight mapping is mechanical.

Outputs (`InceptionFeatures`), named after the TF graph the ADM evaluator reads:
  pool     [N, 2048]  `pool_3`: global average of Mixed_7c; FID, precision and recall.
  spatial  [N, 2023]  `mixed_6/conv[..., :7]` flattened in (h, w, c) order; sFID. In the TF graph `mixed_6` is
                      pytorch-fid's Mixed_6d (mixed=5b, mixed_1=5c, …, mixed_3=6a, mixed_4=6b, …) and its `conv`
                      op is the ReLU output of the 1×1 branch, `Mixed_6d.branch1x1`. That branch is first in the
                      block's concatenation, so these are channels 0..6 of Mixed_6d's 17×17×768 output.
  logits   [N, 1008]  `pool_3 · softmax/weights` without the bias, as the ADM evaluator (and improved-GAN's
                      Inception Score) builds them; pytorch-fid's `fc`. `logits_bias=True` adds `fc.bias`.

Preprocessing (`preprocess_images`): uint8 images are taken as [0, 255], float images as [0, 1] (×255). The
default `mode='adm'` follows the TF graph: resize to 299×299 with TF1's legacy bilinear (align_corners=False,
no half-pixel centres: source = dst·in/out), then (x − 128)/128. `mode='pytorch_fid'` follows pytorch-fid:
torch bilinear (half-pixel centres) on [0, 1], then 2x − 1. Both resizes are explicit interpolation matrices;
`jax.image.resize` uses half-pixel centres and would not reproduce the reference statistics.
"""
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMAGE_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS      # 2023
NUM_LOGITS = 1008
BN_EPS = 1e-3
PREPROCESS_MODES = ("adm", "pytorch_fid")


class InceptionFeatures(NamedTuple):
    pool: Array      # [N, 2048]
    spatial: Array   # [N, 2023]
    logits: Array    # [N, 1008]


# --- preprocessing -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tf1_bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) as an [out, in] matrix.

    TF computes in float32: scale = in/out, src = dst·scale, taps floor(src) and min(floor(src)+1, in−1),
    weight of the upper tap src − floor(src). The weights are reproduced in float32 for that reason.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        src = np.float32(i) * scale
        lo = int(np.floor(src))
        hi = min(lo + 1, in_size - 1)
        frac = np.float32(src - np.float32(lo))
        m[i, lo] += np.float32(1) - frac
        m[i, hi] += frac
    return m


@functools.lru_cache(maxsize=None)
def torch_bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """torch F.interpolate(mode='bilinear', align_corners=False, antialias=False) as an [out, in] matrix.

    Half-pixel centres, src = max((dst + 0.5)·in/out − 0.5, 0), upper tap clamped. The float32 scale and the
    single rounding of the fused multiply-add reproduce torch's float kernels' weights exactly.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        src = np.float32(max(np.float64(scale) * (i + 0.5) - 0.5, 0.0))
        lo = int(src)
        hi = min(lo + 1, in_size - 1)
        frac = np.float32(src - np.float32(lo))
        m[i, lo] += np.float32(1) - frac
        m[i, hi] += frac
    return m


def _resize(x: Array, size: int, build) -> Array:
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    mh = jnp.asarray(build(size, h), jnp.float32)
    mw = jnp.asarray(build(size, w), jnp.float32)
    y = jnp.einsum("oh,nhwc->nowc", mh, x, precision="highest")
    return jnp.einsum("pw,nowc->nopc", mw, y, precision="highest")


def preprocess_images(images: Array, mode: str = "adm") -> Array:
    """uint8 [0, 255] or float [0, 1] NHWC RGB images of any size → float32 [N, 299, 299, 3] network input."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess mode must be one of {PREPROCESS_MODES}, got {mode!r}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
    if images.dtype == jnp.uint8:
        x255 = images.astype(jnp.float32)
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x255 = images.astype(jnp.float32) * 255.0
    else:
        raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
    if mode == "adm":
        return (_resize(x255, IMAGE_SIZE, tf1_bilinear_matrix) - 128.0) / 128.0
    x01 = x255 / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    return 2.0 * _resize(x01, IMAGE_SIZE, torch_bilinear_matrix) - 1.0


# --- layers ------------------------------------------------------------------------------------------------
def _max_pool(x: Array, stride: int, pad: int = 0) -> Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


def _avg_pool_same(x: Array) -> Array:
    """3×3 stride-1 average whose mean skips the zero padding (TF's AvgPool SAME)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class BasicConv(nn.Module):
    """Conv (no bias) → BatchNorm (running statistics, eps 1e-3) → ReLU; `same` pads k//2 on each side."""
    features: int
    kernel: tuple = (1, 1)
    stride: int = 1
    same: bool = True
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else ((0, 0), (0, 0))
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride), padding=pad, use_bias=False,
                    precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


class InceptionA(nn.Module):
    pool_features: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(48, name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), name="branch5x5_2")(b5)
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, same=False, name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, same=False, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, same=False, name="branch3x3_2")(b3)
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, same=False, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool=True` is the FID graph's Mixed_7c (pytorch-fid's FIDInceptionE_2); False is Mixed_7b."""
    max_pool: bool = False
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, 1, pad=1) if self.max_pool else _avg_pool_same(x)
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
    """pytorch-fid's `fc` (TF `softmax/weights`, `softmax/biases`) with the bias optional."""
    use_bias: bool = False
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
        bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        y = jnp.dot(x, kernel, precision=self.precision)
        return y + bias if self.use_bias else y


class InceptionV3(nn.Module):
    """FID InceptionV3: raw images in, `InceptionFeatures` out. Variables: 'params' and 'batch_stats'."""
    preprocess: str = "adm"
    logits_bias: bool = False
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: Array) -> InceptionFeatures:
        x = preprocess_images(images, self.preprocess)
        conv = functools.partial(BasicConv, precision=self.precision)
        x = conv(32, (3, 3), stride=2, same=False, name="Conv2d_1a_3x3")(x)      # 149
        x = conv(32, (3, 3), same=False, name="Conv2d_2a_3x3")(x)                # 147
        x = conv(64, (3, 3), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2)                                                      # 73
        x = conv(80, name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), same=False, name="Conv2d_4a_3x3")(x)               # 71
        x = _max_pool(x, 2)                                                      # 35
        p = self.precision
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)                          # 17
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)              # TF mixed_6/conv[..., :7]
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)                          # 8
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))                                          # TF pool_3
        logits = Logits(use_bias=self.logits_bias, precision=p, name="fc")(pool)
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def init_variables(rng: Array, model: InceptionV3 = InceptionV3()) -> dict:
    """Randomly initialised variables (tests, shape templates); real use loads converted weights."""
    return model.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8))


def abstract_variables(model: InceptionV3 = InceptionV3()) -> dict:
    """Shapes and dtypes of every variable, without allocating them."""
    return jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), model))
