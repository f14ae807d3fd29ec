"""Synthetic class-conditional shapes: RGB images rendered on the fly in JAX, no download.

Image i of a split is a pure function of (seed, split, i): its PRNG key is
`fold_in(fold_in(key(seed), split_id), i)` and its label is `i % NUM_CLASSES`, so any contiguous run of
NUM_CLASSES indices is exactly balanced and a training step's batch depends only on the step number.
Rendering is jitted and vectorised over the batch; each class is a signed distance function (SDF), turned
into an antialiased coverage mask one pixel wide. Pixels are quantised to 8 bits, so the float images equal
`uint8 / 127.5 − 1` exactly.

Classes (shape coordinates are in units of the shape's radius, before rotation and translation):

  0 disk          filled circle
  1 ring          annulus with a hole; ring thickness varies
  2 square        rounded square
  3 triangle      equilateral triangle
  4 plus          cross of two bars; bar width varies
  5 star          five-pointed star; inner radius varies
  6 striped_disk  disk cut by parallel stripes (period ≈ 4–7 px at 64 px): fine detail inside a disk
  7 checker       square cut by a checkerboard (≈ 3–5 cells a side): fine detail inside a square
  8 two_dots      two separate disks (a shape of several parts)
  9 crescent      disk minus an offset disk

Variation within a class: centre, radius (≈ 26–41 px across at 64 px), rotation, foreground colour with a
linear shading, background of two colours mixed by two random sinusoidal gratings plus a gradient, a
light/dark polarity swap (25 %), per-class shape parameters above, and Gaussian pixel noise (σ ≤ 0.025).
"""
import functools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp

Array = jax.Array

CLASS_NAMES = ("disk", "ring", "square", "triangle", "plus", "star", "striped_disk", "checker", "two_dots",
               "crescent")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {"train": 0, "test": 1}
_NUM_UNIFORMS = 34


# --- signed distance functions in shape units (negative inside) ---------------------------------------------
def _box(x, y, hx, hy):
    dx, dy = jnp.abs(x) - hx, jnp.abs(y) - hy
    outside = jnp.sqrt(jnp.square(jnp.maximum(dx, 0)) + jnp.square(jnp.maximum(dy, 0)))
    return outside + jnp.minimum(jnp.maximum(dx, dy), 0)


def _star(x, y, n: int, outer, inner):
    """Exact SDF of an n-pointed star (tips at radius `outer`, notches at `inner`) by folding into one wedge;
    inner = outer·cos(π/n) gives the regular n-gon."""
    wedge = math.pi / n
    radius = jnp.sqrt(x * x + y * y)
    phi = jnp.mod(jnp.arctan2(y, x), 2 * wedge)
    phi = jnp.minimum(phi, 2 * wedge - phi)
    px, py = radius * jnp.cos(phi), radius * jnp.sin(phi)
    ax, ay = outer, 0.0                                            # the tip
    bx, by = inner * math.cos(wedge), inner * math.sin(wedge)      # the notch
    ex, ey = bx - ax, by - ay
    t = jnp.clip(((px - ax) * ex + (py - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = jnp.sqrt(jnp.square(px - ax - t * ex) + jnp.square(py - ay - t * ey))
    # inside iff p lies on the origin's side of the edge line (the origin gives cross > 0)
    cross = ex * (py - ay) - ey * (px - ax)
    return jnp.where(cross > 0, -dist, dist)


def _stripes(u, period):
    """Bands of half the period, centred on multiples of the period, as a 1-D SDF."""
    frac = u / period - jnp.floor(u / period)
    return (jnp.abs(frac - 0.5) - 0.25) * period


def _checker(x, y, cell):
    ux, uy = x / cell, y / cell
    parity = jnp.sign(jnp.sin(math.pi * ux) * jnp.sin(math.pi * uy))
    edge = jnp.minimum(jnp.abs(ux - jnp.round(ux)), jnp.abs(uy - jnp.round(uy))) * cell
    return -parity * edge


def _class_sdfs(x, y, u):
    """[NUM_CLASSES, H, W] SDFs in shape units; u holds per-image uniforms in [0, 1) for shape parameters."""
    r = jnp.sqrt(x * x + y * y)
    disk = r - 1.0
    ring = jnp.abs(r - 0.72) - (0.16 + 0.12 * u[0])
    square = _box(x, y, 0.72, 0.72) - 0.1
    triangle = _star(x, y, 3, 1.1, 1.1 * math.cos(math.pi / 3))
    arm = 0.24 + 0.14 * u[1]
    plus = jnp.minimum(_box(x, y, 1.0, arm), _box(x, y, arm, 1.0))
    star = _star(x, y, 5, 1.1, 1.1 * (0.38 + 0.14 * u[2]))
    period = 0.38 + 0.14 * u[3]
    striped = jnp.maximum(disk, _stripes(x + period * u[4], period))
    cell = 0.36 + 0.14 * u[5]
    checker = jnp.maximum(_box(x, y, 0.85, 0.85), _checker(x + cell * u[6], y + cell * u[7], cell))
    dot_r, gap = 0.38 + 0.1 * u[8], 0.55 + 0.1 * u[9]
    two = jnp.minimum(jnp.hypot(x - gap, y) - dot_r, jnp.hypot(x + gap, y) - dot_r)
    offset = 0.35 + 0.15 * u[10]
    crescent = jnp.maximum(disk, -(jnp.hypot(x - offset, y) - 0.85))
    return jnp.stack([disk, ring, square, triangle, plus, star, striped, checker, two, crescent])


# --- colour ---------------------------------------------------------------------------------------------------
def _hsv_to_rgb(h, s, v):
    """Scalars h, s, v in [0, 1] → RGB [3]."""
    n = jnp.array([5.0, 3.0, 1.0])
    k = jnp.mod(n + h * 6.0, 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _grating(x, y, freq, angle, phase):
    return jnp.sin(math.pi * freq * (x * jnp.cos(angle) + y * jnp.sin(angle)) + phase)


# --- one image --------------------------------------------------------------------------------------------------
def render(key: Array, label: Array, image_size: int = 64) -> Array:
    """One image [S, S, 3] in [0, 1] (not yet 8-bit quantised) of class `label`, its variation drawn from key."""
    k_u, k_noise = jax.random.split(key)
    u = jax.random.uniform(k_u, (_NUM_UNIFORMS,))
    px = 2.0 / image_size                                          # one pixel in [-1, 1] image units
    coords = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) * px - 1.0
    gy, gx = jnp.meshgrid(coords, coords, indexing="ij")

    radius = 0.4 + 0.24 * u[11]
    reach = 0.97 - radius
    cx, cy = reach * (2 * u[12] - 1), reach * (2 * u[13] - 1)
    theta = 2 * math.pi * u[14]
    dx, dy = gx - cx, gy - cy
    lx = (jnp.cos(theta) * dx + jnp.sin(theta) * dy) / radius      # rotate by −θ into shape units
    ly = (-jnp.sin(theta) * dx + jnp.cos(theta) * dy) / radius
    sdf = jnp.take(_class_sdfs(lx, ly, u[:11]), label, axis=0) * radius
    alpha = jnp.clip(0.5 - sdf / px, 0.0, 1.0)[..., None]

    dark_shape = u[15] < 0.25
    fg_value = jnp.where(dark_shape, 0.12 + 0.2 * u[16], 0.7 + 0.3 * u[16])
    bg_value = jnp.where(dark_shape, 0.6 + 0.3 * u[17], 0.12 + 0.38 * u[17])
    fg = _hsv_to_rgb(u[18], 0.55 + 0.45 * u[19], fg_value)
    bg0 = _hsv_to_rgb(u[20], 0.1 + 0.4 * u[21], bg_value)
    bg1 = _hsv_to_rgb(jnp.mod(u[20] + 0.25 * (u[22] - 0.5), 1.0), 0.1 + 0.4 * u[21],
                      jnp.clip(bg_value + 0.3 * (u[23] - 0.5), 0.0, 1.0))
    texture = 0.5 + 0.25 * _grating(gx, gy, 1 + 5 * u[24], 2 * math.pi * u[25], 2 * math.pi * u[26]) \
        + 0.25 * _grating(gx, gy, 2 + 8 * u[27], 2 * math.pi * u[28], 2 * math.pi * u[29])
    background = bg0 + (bg1 - bg0) * texture[..., None]
    background = background * (1 + 0.15 * (gx * jnp.cos(2 * math.pi * u[30]))[..., None])
    shading = 1 + 0.15 * (lx * jnp.cos(2 * math.pi * u[31]) + ly * jnp.sin(2 * math.pi * u[31])) * radius
    foreground = fg * shading[..., None]

    image = background * (1 - alpha) + foreground * alpha
    sigma = 0.025 * u[32] * u[33]                                # most images have little noise
    image = image + sigma * jax.random.normal(k_noise, image.shape)
    return jnp.clip(image, 0.0, 1.0)


# --- batches ----------------------------------------------------------------------------------------------------
def labels_of(indices: Array) -> Array:
    return (jnp.asarray(indices) % NUM_CLASSES).astype(jnp.int32)


def batch_indices(step, batch_size: int, dataset_size: int = 0) -> Array:
    """The dataset indices of a training step: a pure function of the step, so resumed runs see the same data.
    dataset_size 0 means endless fresh images; > 0 cycles through a finite set of that many images."""
    if dataset_size < 0:
        raise ValueError(f"dataset_size must be ≥ 0 (0 = endless), got {dataset_size}")
    indices = jnp.asarray(step, jnp.int32) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    return indices % dataset_size if dataset_size else indices


def _check(split: str, image_size: int):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")


@functools.partial(jax.jit, static_argnames=("render_fn", "labels_fn", "image_size"))
def _rendered_uint8(render_fn, labels_fn, seed, indices, split_id, image_size: int):
    base = jax.random.fold_in(jax.random.key(seed), split_id)
    labels = labels_fn(indices)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    images = jax.vmap(render_fn, in_axes=(0, 0, None))(keys, labels, image_size)
    return jnp.round(images * 255.0).astype(jnp.uint8), labels


def rendered_batch_uint8(render_fn, labels_fn, seed, indices, split: str, image_size: int):
    """Images `render_fn(fold_in(fold_in(key(seed), split), i), labels_fn(i))` of dataset `indices`, as uint8
    with their labels: the one batch maker of every synthetic dataset here (image i a pure function of seed,
    split and i)."""
    _check(split, image_size)
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 1:
        raise ValueError(f"indices must be a 1-D array, got shape {indices.shape}")
    return _rendered_uint8(render_fn, labels_fn, seed, indices, SPLITS[split], image_size)


def make_batch_uint8(seed: Union[int, Array], indices: Union[Sequence[int], Array], *, split: str = "train",
                     image_size: int = 64):
    """(images uint8 [B, S, S, 3], labels int32 [B]) for dataset `indices` of `split`; jittable inside a step."""
    return rendered_batch_uint8(render, labels_of, seed, indices, split, image_size)


def make_batch(seed: Union[int, Array], indices: Union[Sequence[int], Array], *, split: str = "train",
               image_size: int = 64):
    """(images float32 [B, S, S, 3] in [-1, 1], labels int32 [B]): the model input of `make_batch_uint8`."""
    images, labels = make_batch_uint8(seed, indices, split=split, image_size=image_size)
    return to_float(images), labels


def to_float(images_uint8: Array) -> Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: Array) -> Array:
    """[-1, 1] floats → uint8 (rounded, clipped)."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)
