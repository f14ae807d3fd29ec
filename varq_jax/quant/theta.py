"""The shift-and-sum threshold θ: attention statistics from a quantized sampling pass, then the BOP-budgeted search."""
import functools

import jax
import jax.numpy as jnp

from varq_jax import sampling
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import bops


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_with_stats(vae, var, settings, params, quant, labels, keys):
    _, _, sown = sampling.generate(vae, var, settings, params, quant, labels, keys, collect_intermediates=True)
    return sown


def attention_statistics(vae_cfg, var_cfg, params, quant, policy, labels, keys, settings, dtype=jnp.float32):
    """Per (block, scale): the mean FP attention over queries [2B, H, S] (CFG-doubled batch) and the query count,
    from one KV-cached sampling pass of the quantized model (as the official measures it)."""
    sown = _sample_with_stats(VQVAE(vae_cfg, dtype), VAR(var_cfg, dtype, policy), settings, params, quant,
                              jnp.asarray(labels), keys)
    means, counts = [], []
    for i in range(var_cfg.depth):
        for si, pn in enumerate(var_cfg.patch_nums):
            (m,) = sown[si][f"blocks_{i}"]["attn"]["attn_mean"]
            means.append(m)
            counts.append(pn * pn)
    return means, counts


def search(var_cfg, means, counts, w_bits: int, a_bits: int, alpha: float, n_grids: int):
    """θ for the budget α·(total BOPs at w_bits/a_bits). Returns (θ, note): when even the finest grid value is
    within budget (a small model), θ is that value and the note says so, where the reference would stop."""
    total = bops.total_bops(var_cfg, w_bits, a_bits)
    try:
        return bops.search_theta(means, counts, total, a_bits, var_cfg.head_dim, alpha, n_grids), ""
    except ValueError as e:
        if "insufficient" not in str(e):
            raise
        return float(bops.theta_grid(n_grids)[0]), f"finest grid value taken ({e})"
