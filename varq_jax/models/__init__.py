"""VQVAE and VAR in Flax, and the model zoo."""
from varq_jax.models.var import VAR, VARConfig, init_cache
from varq_jax.models.vqvae import VQVAE, VQVAEConfig
from varq_jax.models.zoo import preset
