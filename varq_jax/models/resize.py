"""PyTorch-exact resize operators as explicit interpolation matrices.

`jax.image.resize` uses a different bicubic kernel (A = -0.5) and edge rule, and has no overlapping-window
"area" mode, so VAR's multi-scale quantizer would drift. Each operator here is a [out, in] matrix built in
float64 NumPy at trace time and applied separably: Y = M_h · X · M_wᵀ on NHWC tensors.
"""
import functools
import math

import jax.numpy as jnp
import numpy as np


def _cubic(d: np.ndarray, a: float = -0.75) -> np.ndarray:
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """torch F.interpolate(mode='bicubic', align_corners=False): A = -0.75, half-pixel centres, clamped taps."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]))
        for tap, w in zip(range(i0 - 1, i0 + 3), weights):
            m[i, min(max(tap, 0), in_size - 1)] += w
    return m


@functools.lru_cache(maxsize=None)
def area_matrix(out_size: int, in_size: int) -> np.ndarray:
    """torch F.interpolate(mode='area') = adaptive average pooling: windows [⌊i·In/Out⌋, ⌈(i+1)·In/Out⌉)."""
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        lo = (i * in_size) // out_size
        hi = -((-(i + 1) * in_size) // out_size)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


@functools.lru_cache(maxsize=None)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """torch F.interpolate(mode='bilinear', align_corners=False), no antialias (used for editing masks)."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        t = src - i0
        m[i, i0] += 1 - t
        m[i, i1] += t
    return m


_BUILDERS = {"bicubic": bicubic_matrix, "area": area_matrix, "bilinear": bilinear_matrix}


def resize(x: jnp.ndarray, size: int, mode: str) -> jnp.ndarray:
    """Resizes NHWC `x` (square maps) to (size, size) with PyTorch's semantics; identity when sizes match."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (size, size):
        return x
    build = _BUILDERS[mode]
    mh = jnp.asarray(build(size, h), jnp.float32)
    mw = jnp.asarray(build(size, w), jnp.float32)
    hp = "highest"
    y = jnp.einsum("oh,...hwc->...owc", mh, x.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,...owc->...opc", mw, y, precision=hp).astype(x.dtype)
