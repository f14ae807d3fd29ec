"""The calibration set: FP-generated token maps with the per-position probabilities they were drawn from.

As the official pipeline: one sample per label (distinct classes, NumPy-seeded), CFG 1.5, top-k 900,
top-p 0.96. Generated batched by the compiled sampler (per-image keys from (seed, i)), not one sample at a time.
"""
import dataclasses
import functools
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax import sampling
from varq_jax.models.var import VAR, VARConfig
from varq_jax.models.vqvae import VQVAE, VQVAEConfig


@dataclasses.dataclass
class CalibrationSet:
    labels: np.ndarray                  # [N] int32
    tokens: List[jax.Array]             # per scale [N, pn²] int32
    probs: Optional[List[jax.Array]]    # per scale [N, pn², V] float32, after top-k/top-p masking


def calibration_labels(num: int, num_classes: int, seed: int) -> np.ndarray:
    """`num` labels: distinct classes drawn as the official (np.random.seed(seed); choice without replacement);
    beyond num_classes, further rounds of shuffled classes."""
    if num <= 0:
        raise ValueError(f"the calibration set needs at least one sample, got {num}")
    rng = np.random.RandomState(seed)
    if num <= num_classes:
        return rng.choice(num_classes, num, replace=False).astype(np.int32)
    rounds = [rng.choice(num_classes, num_classes, replace=False) for _ in range(-(-num // num_classes))]
    return np.concatenate(rounds)[:num].astype(np.int32)


def per_image_keys(seed: int, indices) -> jax.Array:
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate_with_probs(vae, var, settings, params, labels, keys):
    _, tokens, logged = sampling.generate(vae, var, settings, params, None, labels, keys, collect_logits=True)
    return tokens, [jax.nn.softmax(masked, axis=-1) for _, masked in logged]


def generate_calibration(vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, labels: np.ndarray, seed: int,
                         settings: sampling.SamplingConfig, batch_size: int = 32, dtype=jnp.float32,
                         keep_probs: bool = True, progress=None) -> CalibrationSet:
    """Samples the FP model once per label, keeping the tokens and (optionally) the masked probabilities;
    `progress(samples done, samples)` after each batch."""
    labels = sampling.validate(settings, var_cfg, labels)
    vae, var = VQVAE(vae_cfg, dtype), VAR(var_cfg, dtype)
    n = len(labels)
    bs = min(batch_size, n)
    tokens, probs = [], []
    for start in range(0, n, bs):
        idx = np.arange(start, start + bs) % n             # the last batch is padded with repeats, then trimmed
        t, p = _generate_with_probs(vae, var, settings, params, jnp.asarray(labels[idx]), per_image_keys(seed, idx))
        keep = min(bs, n - start)
        tokens.append([a[:keep] for a in t])
        probs.append([a[:keep] for a in p] if keep_probs else None)
        if progress is not None:
            jax.block_until_ready(t)
            progress(start + keep, n)
    cat = lambda parts: [jnp.concatenate(s, axis=0) for s in zip(*parts)]
    return CalibrationSet(labels, cat(tokens), cat(probs) if keep_probs else None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _teacher_forced_probs(vae, var, settings, params, labels, tokens):
    x = vae.apply({"params": params["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    b, cfg = labels.shape[0], var.cfg
    both = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)])
    logits = var.apply({"params": params["var"]}, both, jnp.concatenate([x, x])).astype(jnp.float32)
    out, sn = [], cfg.num_scales
    for si, (start, end) in enumerate(cfg.begin_ends):
        t = settings.cfg * (si / (sn - 1) if sn > 1 else 0.0)
        guided = (1 + t) * logits[:b, start:end] - t * logits[b:, start:end]
        out.append(jax.nn.softmax(sampling.mask_top_k_top_p(guided, settings.top_k, settings.top_p), axis=-1))
    return out


def teacher_forced_probs(vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, labels: np.ndarray,
                         tokens: List[jax.Array], settings: sampling.SamplingConfig, batch_size: int = 32,
                         dtype=jnp.float32) -> List[jax.Array]:
    """The masked probabilities each calibration token was drawn from, recomputed teacher-forced (one forward
    over the stored token maps, CFG and top-k/top-p as in sampling): what resampling needs when the calibration
    set comes from disk or from another run. In float32 they equal the sampling-time ones to float rounding."""
    labels = sampling.validate(settings, var_cfg, labels)
    vae, var = VQVAE(vae_cfg, dtype), VAR(var_cfg, dtype)
    n, bs = len(labels), min(batch_size, len(labels))
    parts = []
    for start in range(0, n, bs):
        idx = np.arange(start, start + bs) % n
        p = _teacher_forced_probs(vae, var, settings, params, jnp.asarray(labels[idx]),
                                  [jnp.asarray(t)[idx] for t in tokens])
        parts.append([a[:min(bs, n - start)] for a in p])
    return [jnp.concatenate(s, axis=0) for s in zip(*parts)]
