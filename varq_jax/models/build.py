"""Parameter initialisation and shapes for a VQVAE + VAR pair."""
import jax
import jax.numpy as jnp

from varq_jax.models.var import VAR, VARConfig
from varq_jax.models.vqvae import VQVAE, VQVAEConfig


# `lazy_init` traces the forward on shapes only and computes just the initialisers (the same values as `init`,
# in half the time on a CPU: the forward pass is never run).
def _vae_init(cfg: VQVAEConfig, key):
    img = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    return VQVAE(cfg).lazy_init(key, img)["params"]


def _var_init(cfg: VARConfig, key):
    x = jax.ShapeDtypeStruct((1, cfg.L - cfg.patch_nums[0] ** 2, cfg.cvae), jnp.float32)
    return VAR(cfg).lazy_init(key, jax.ShapeDtypeStruct((1,), jnp.int32), x)["params"]


def init_params(vae_cfg: VQVAEConfig, var_cfg: VARConfig, key) -> dict:
    """Random parameters {'vae': ..., 'var': ...} (Flax default initialisers; VAR's truncated-normal embeddings)."""
    k1, k2 = jax.random.split(key)
    return {"vae": _vae_init(vae_cfg, k1), "var": _var_init(var_cfg, k2)}


def abstract_params(vae_cfg: VQVAEConfig, var_cfg: VARConfig) -> dict:
    """Shapes/dtypes of `init_params` without allocating anything."""
    return jax.eval_shape(lambda: init_params(vae_cfg, var_cfg, jax.random.PRNGKey(0)))
