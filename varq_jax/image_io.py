"""Images on disk: float [0, 1] ↔ uint8, PNG grids, reading an input image for editing."""
import math
import os

import numpy as np
from PIL import Image
from varq_jax.files import atomic_write


def to_uint8(images) -> np.ndarray:
    """[0, 1] floats → uint8 by rounding (x·255 + 0.5, clipped)."""
    return np.clip(np.asarray(images, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int = 0, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] → one uint8 image with N tiles in rows of `ncol` (default ≈ √N), white padding."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = im
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes atomically (temp file + rename)."""
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def save_npz(path: str, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB. PIL opens 16-bit grayscale PNGs as integer modes whose convert('RGB') clips at 255 (near-white):
    those are scaled from 16 bits first."""
    if im.mode.startswith("I"):
        a = np.asarray(im, np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path: str, size: int) -> np.ndarray:
    """An RGB image as float32 [size, size, 3] in [-1, 1]; other sizes are centre-cropped and resized (bicubic)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image: {path}")
    try:
        im = _rgb8(Image.open(path))
    except OSError as e:
        raise ValueError(f"cannot read {path!r} as an image: {e}") from e
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 127.5 - 1.0
