"""Shapes × textures × layouts: 100 synthetic classes, the research default's dataset (64 px, rendered in JAX).

Class c is the triple (shape c % 10, texture (c // 10) % 5, layout c // 50), so a contiguous run of 100 indices is
exactly balanced (label = index % 100, as in `shapes`). Classes differ in what a quantized model tends to get
wrong: the outline of a shape, a periodic texture of ≈ 6–10 px inside it, and whether one large or two small
copies are drawn. Textures are sized in pixels, not in shape units, so they survive the small copies of the pair
layout and stay above the 4-px patch of a 16×16 latent.

  shapes   disk, square, triangle, plus, star, crescent, half_disk, rhombus, heart, corner (an L)
  textures solid, stripes (period 8–10 px), checker (cells 6–8 px), dots (spacing 8–10 px), outline (a 3–4 px
           border around an interior of the second colour)
  layouts  single (one shape ≈ 35–42 px across), pair (two copies ≈ 22–24 px across, side by side)

Shapes are upright and near the centre (jitter ≤ 4 px; ≤ 10 px vertically for pairs): the classes are hard
because there are many and they differ in fine structure, not because of pose, so that a small VAR trained for
minutes renders them reliably (class accuracy ≥ 0.9) and low-bit quantization visibly breaks them.
Variation within a class: position, size, texture period and phase, the two foreground colours (one hue,
contrasting values),
a low-saturation background with a linear gradient, a light/dark polarity swap (25 %), pixel noise (σ ≤ 0.02).
Image i of a split is a pure function of (seed, split, i), as in `shapes`.
"""
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp

from varq_jax.data.shapes import (_box, _checker, _hsv_to_rgb, _star, _stripes, batch_indices,
                                  rendered_batch_uint8, to_float, to_uint8)

Array = jax.Array

SHAPES = ("disk", "square", "triangle", "plus", "star", "crescent", "half_disk", "rhombus", "heart", "corner")
TEXTURES = ("solid", "stripes", "checker", "dots", "outline")
LAYOUTS = ("single", "pair")
CLASS_NAMES = tuple(f"{LAYOUTS[c // 50]}_{TEXTURES[(c // 10) % 5]}_{SHAPES[c % 10]}" for c in range(100))
NUM_CLASSES = len(CLASS_NAMES)
_NUM_UNIFORMS = 24

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "SHAPES", "TEXTURES", "LAYOUTS", "attributes", "batch_indices",
           "labels_of", "make_batch", "make_batch_uint8", "render", "to_float", "to_uint8"]


def attributes(label):
    """(shape, texture, layout) indices of a class label."""
    return label % 10, (label // 10) % 5, label // 50


# --- shapes in their own units (radius ≈ 1, centred on the origin, negative inside) ----------------------------
def _heart(x, y):
    """A heart of two circular lobes over a point (|x| folds it onto one lobe), its tip at y = 0 before centring;
    every shape is rotated at random, so its orientation here does not matter."""
    scale = 1.5
    x, y = jnp.abs(x) / scale, y / scale + 0.5
    lobe = jnp.hypot(x - 0.25, y - 0.75) - math.sqrt(2) / 4
    m = 0.5 * jnp.maximum(x + y, 0.0)
    edge = jnp.sqrt(jnp.minimum(jnp.square(x) + jnp.square(y - 1.0), jnp.square(x - m) + jnp.square(y - m)))
    return jnp.where(y + x > 1.0, lobe, edge * jnp.sign(x - y)) * scale


def _shape_sdfs(x, y):
    """[10, H, W] signed distances in shape units."""
    r = jnp.hypot(x, y)
    disk = r - 1.0
    square = _box(x, y, 0.78, 0.78) - 0.08
    triangle = _star(x, y, 3, 1.15, 1.15 * math.cos(math.pi / 3))
    plus = jnp.minimum(_box(x, y, 1.0, 0.32), _box(x, y, 0.32, 1.0))
    star = _star(x, y, 5, 1.15, 1.15 * 0.45)
    crescent = jnp.maximum(disk, -(jnp.hypot(x - 0.45, y) - 0.8))
    half_disk = jnp.maximum(jnp.hypot(x, y + 0.4) - 1.0, -(y + 0.4))
    a, b = 1.1, 0.62                                       # rhombus half-diagonals
    rhombus = (jnp.abs(x) / a + jnp.abs(y) / b - 1.0) * (a * b / math.hypot(a, b))
    heart = _heart(x, y)
    corner = jnp.minimum(_box(x + 0.5, y, 0.32, 0.85), _box(x, y - 0.53, 0.85, 0.32))
    return jnp.stack([disk, square, triangle, plus, star, crescent, half_disk, rhombus, heart, corner])


# --- textures in pixels (signed distance of the second colour's region, negative inside it) ----------------------
def _texture_sdf(texture, u, v, shape_sdf_px, w):
    """u, v: pixel coordinates along the shape's axes; w: uniforms for the texture's period and phase."""
    period = 8.0 + 2.0 * w[0]
    stripes = _stripes(u + period * w[1], period)
    cell = 6.0 + 2.0 * w[0]
    checker = _checker(u + cell * w[1], v + cell * w[2], cell)
    spacing = 8.0 + 2.0 * w[0]
    du = u + spacing * w[1]
    dv = v + spacing * w[2]
    dots = jnp.hypot(du - spacing * jnp.round(du / spacing), dv - spacing * jnp.round(dv / spacing)) - 0.3 * spacing
    border = 3.0 + 1.0 * w[3]
    outline = -(shape_sdf_px + border)                    # the interior deeper than the border
    solid = jnp.full_like(u, 1e3)                          # no second-colour region
    return jnp.take(jnp.stack([solid, stripes, checker, dots, outline]), texture, axis=0)


# --- one image ----------------------------------------------------------------------------------------------------
def _shape_layer(gx, gy, label, cx, cy, radius, theta, w, image_size):
    """(coverage of the shape, coverage of its second-colour texture region) [H, W], both antialiased."""
    shape, texture, _ = attributes(label)
    px = 2.0 / image_size
    dx, dy = gx - cx, gy - cy
    lx = (jnp.cos(theta) * dx + jnp.sin(theta) * dy) / radius
    ly = (-jnp.sin(theta) * dx + jnp.cos(theta) * dy) / radius
    sdf_px = jnp.take(_shape_sdfs(lx, ly), shape, axis=0) * radius / px
    tex_px = _texture_sdf(texture, lx * radius / px, ly * radius / px, sdf_px, w)
    return jnp.clip(0.5 - sdf_px, 0.0, 1.0), jnp.clip(0.5 - tex_px, 0.0, 1.0)


def render(key: Array, label: Array, image_size: int = 64) -> Array:
    """One image [S, S, 3] in [0, 1] of class `label`, its variation drawn from key."""
    k_u, k_noise = jax.random.split(key)
    u = jax.random.uniform(k_u, (_NUM_UNIFORMS,))
    coords = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) * (2.0 / image_size) - 1.0
    gy, gx = jnp.meshgrid(coords, coords, indexing="ij")
    pair = attributes(label)[2] == 1

    # upright shapes near the centre: single, radius 0.55–0.65; pair, two of 0.34–0.38 side by side; small jitter
    radius = jnp.where(pair, 0.34 + 0.04 * u[0], 0.55 + 0.1 * u[0])
    half_gap = jnp.where(pair, radius + 0.08 + 0.04 * u[1], 0.0)
    cx = jnp.where(pair, 0.08, 0.12) * (2 * u[3] - 1)
    cy = jnp.where(pair, 0.3, 0.12) * (2 * u[4] - 1)
    w = u[5:9]
    cov_a, tex_a = _shape_layer(gx, gy, label, cx + half_gap, cy, radius, 0.0, w, image_size)
    cov_b, tex_b = _shape_layer(gx, gy, label, cx - half_gap, cy, radius, 0.0, w, image_size)
    cov_b, tex_b = cov_b * pair, tex_b * pair
    alpha = jnp.maximum(cov_a, cov_b)[..., None]
    second = (tex_a * cov_a + tex_b * cov_b)[..., None]    # copies never overlap (gap > 0)

    dark_shape = u[11] < 0.25
    hue = u[12]
    fg_value = jnp.where(dark_shape, 0.15 + 0.15 * u[13], 0.75 + 0.25 * u[13])
    fg2_value = jnp.where(dark_shape, fg_value + 0.3, fg_value - 0.4)
    bg_value = jnp.where(dark_shape, 0.7 + 0.25 * u[14], 0.1 + 0.3 * u[14])
    fg = _hsv_to_rgb(hue, 0.6 + 0.4 * u[15], fg_value)
    fg2 = _hsv_to_rgb(hue, 0.6 + 0.4 * u[15], fg2_value)
    bg0 = _hsv_to_rgb(u[16], 0.1 + 0.3 * u[17], bg_value)
    bg1 = _hsv_to_rgb(jnp.mod(u[16] + 0.2 * (u[18] - 0.5), 1.0), 0.1 + 0.3 * u[17],
                      jnp.clip(bg_value + 0.2 * (u[19] - 0.5), 0.0, 1.0))
    ramp = 0.5 + 0.5 * (gx * jnp.cos(2 * math.pi * u[20]) + gy * jnp.sin(2 * math.pi * u[20])) / math.sqrt(2)
    background = bg0 + (bg1 - bg0) * ramp[..., None]
    foreground = fg + (fg2 - fg) * second

    image = background * (1 - alpha) + foreground * alpha
    sigma = 0.02 * u[21] * u[22]
    image = image + sigma * jax.random.normal(k_noise, image.shape)
    return jnp.clip(image, 0.0, 1.0)


# --- batches --------------------------------------------------------------------------------------------------------
def labels_of(indices: Array) -> Array:
    return (jnp.asarray(indices) % NUM_CLASSES).astype(jnp.int32)


def make_batch_uint8(seed: Union[int, Array], indices: Union[Sequence[int], Array], *, split: str = "train",
                     image_size: int = 64):
    """(images uint8 [B, S, S, 3], labels int32 [B]) for dataset `indices` of `split`; jittable inside a step."""
    return rendered_batch_uint8(render, labels_of, seed, indices, split, image_size)


def make_batch(seed: Union[int, Array], indices: Union[Sequence[int], Array], *, split: str = "train",
               image_size: int = 64):
    """(images float32 [B, S, S, 3] in [-1, 1], labels int32 [B])."""
    images, labels = make_batch_uint8(seed, indices, split=split, image_size=image_size)
    return to_float(images), labels
