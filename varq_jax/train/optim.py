"""AdamW with linear warm-up, cosine decay and global-norm clipping, built from a config section."""
import jax
import jax.numpy as jnp
import optax

# Parameters that are never weight-decayed besides 1-D ones (biases, norms): position/level tables, as in VAR.
NO_DECAY_NAMES = ("pos_1LC", "pos_start", "lvl_embed", "ada_gss", "scale_mul", "embedding")


def schedule(cfg, num_steps: int) -> optax.Schedule:
    """Warm-up from lr·warmup_init to lr over warmup_steps, then cosine to lr·end_ratio at num_steps."""
    warmup = min(int(cfg.warmup_steps), max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr * cfg.warmup_init, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=cfg.lr * cfg.end_ratio)


def decay_mask(params):
    """True for ≥2-D parameters whose name is not in NO_DECAY_NAMES."""
    def keep(path, leaf):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return leaf.ndim >= 2 and not names & set(NO_DECAY_NAMES)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
    """cfg fields: lr, warmup_steps, warmup_init, end_ratio, b1, b2, weight_decay, grad_clip (≤ 0: none)."""
    if cfg.lr <= 0:
        raise ValueError(f"learning rate must be positive, got {cfg.lr}")
    adamw = optax.adamw(schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def global_norm(tree) -> jax.Array:
    """‖tree‖₂ over all leaves, in float32 (for logging the gradient norm)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
