"""A small CNN classifier of the shapes dataset; its penultimate features are the feature network of the
quality metrics (the role Inception plays for ImageNet), its predictions give the class accuracy of samples.

Layout: per stage two 3×3 convs (GroupNorm, GELU), 2×2 average pooling between stages, global mean pool,
Dense → GELU (the features), Dense → logits. No batch statistics, so inference is a pure function of params.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int = 10
    widths: tuple = (32, 64, 96, 128)
    feature_dim: int = 128
    groups: int = 8

    def __post_init__(self):
        bad = [w for w in self.widths if w % self.groups]
        if bad:
            raise ValueError(f"classifier widths {bad} are not divisible by groups={self.groups}")


class Classifier(nn.Module):
    cfg: ClassifierConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array):
        """images [B, H, W, 3] in [-1, 1] → (logits [B, num_classes] float32, features [B, feature_dim] float32)."""
        cfg = self.cfg
        h = images.astype(self.dtype)
        for i, width in enumerate(cfg.widths):
            for j in range(2):
                h = nn.Conv(width, (3, 3), dtype=self.dtype, name=f"stage{i}_conv{j}")(h)
                h = nn.GroupNorm(cfg.groups, dtype=jnp.float32, name=f"stage{i}_norm{j}")(h)
                h = nn.gelu(h).astype(self.dtype)
            if i != len(cfg.widths) - 1:
                h = nn.avg_pool(h, (2, 2), (2, 2))
        pooled = h.astype(jnp.float32).mean(axis=(1, 2))
        features = nn.gelu(nn.Dense(cfg.feature_dim, dtype=self.dtype, name="features")(pooled))
        logits = nn.Dense(cfg.num_classes, dtype=self.dtype, name="logits")(features)
        return logits.astype(jnp.float32), features.astype(jnp.float32)


def init_params(cfg: ClassifierConfig, key: Array, image_size: int = 64) -> dict:
    return Classifier(cfg).init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]


def _as_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images → [-1, 1] float32; float images are taken to be in [-1, 1] already (host-side, so both kinds
    share one compiled program)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be NHWC RGB [N, H, W, 3], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _apply(cfg: ClassifierConfig, params, images):
    return Classifier(cfg).apply({"params": params}, images)


def apply_batched(cfg: ClassifierConfig, params, images, batch_size: int = 256):
    """(logits [N, K], features [N, D]) as NumPy float32, in fixed-size batches (one compilation)."""
    images = _as_model_input(np.asarray(images))
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images given")
    logits, feats = [], []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        lg, ft = _apply(cfg, params, chunk)
        keep = chunk.shape[0] - pad
        logits.append(np.asarray(lg)[:keep])
        feats.append(np.asarray(ft)[:keep])
    return np.concatenate(logits), np.concatenate(feats)


def extract_features(cfg: ClassifierConfig, params, images, batch_size: int = 256) -> np.ndarray:
    """Penultimate features [N, feature_dim] (float32) of uint8 or [-1, 1] float NHWC images."""
    return apply_batched(cfg, params, images, batch_size)[1]


def predict(cfg: ClassifierConfig, params, images, batch_size: int = 256) -> np.ndarray:
    return apply_batched(cfg, params, images, batch_size)[0].argmax(-1).astype(np.int32)


def class_accuracy(cfg: ClassifierConfig, params, images, labels, batch_size: int = 256) -> float:
    """Fraction of images whose predicted class is the given label (e.g. the class a sample was drawn for)."""
    labels = np.asarray(labels)
    if labels.shape != (np.shape(images)[0],):
        raise ValueError(f"labels must have shape ({np.shape(images)[0]},), got {labels.shape}")
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise ValueError(f"labels must lie in [0, {cfg.num_classes}), got range [{labels.min()}, {labels.max()}]")
    return float(np.mean(predict(cfg, params, images, batch_size) == labels))
