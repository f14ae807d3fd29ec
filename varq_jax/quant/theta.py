"""The shift-and-sum threshold θ: attention statistics from a quantized sampling pass, then the BOP-budgeted search."""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from varq_jax import sampling
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import bops


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_with_stats(vae, var, settings, params, quant, labels, keys):
    _, _, sown = sampling.generate(vae, var, settings, params, quant, labels, keys, collect_intermediates=True,
                                   prepared=True)
    return sown


def shift_and_sum_blocks(var_cfg, policy) -> list:
    """(block index, a_bits) of every attention whose rule quantizes it with shift-and-sum."""
    out = []
    for i in range(var_cfg.depth):
        r = policy.rule_for(f"blocks_{i}/attn")
        if r.attn and r.shift_and_sum:
            out.append((i, r.a_bits))
    return out


def attention_statistics(vae_cfg, var_cfg, params, quant, policy, labels, keys, settings, dtype=jnp.float32):
    """Per (shift-and-sum block, scale): the mean FP attention over queries [2B, H, S] (CFG-doubled batch), the
    query count and the block's a_bits, from one KV-cached sampling pass of the quantized model (as the official
    measures it)."""
    # Weights quantized once, outside the program, and the program's policy made phase-free: the passes before
    # and after reconstruction (nearest and learned rounding) then share one compiled sampler.
    inf = policy.for_inference()
    w_hat, quant = inf.prepare_params(params["var"], quant)
    program_policy = dataclasses.replace(inf, phase="nearest")
    sown = _sample_with_stats(VQVAE(vae_cfg, dtype), VAR(var_cfg, dtype, program_policy), settings,
                              {"vae": params["vae"], "var": w_hat}, quant, jnp.asarray(labels), keys)
    means, counts, bits = [], [], []
    for i, a_bits in shift_and_sum_blocks(var_cfg, policy):
        for si, pn in enumerate(var_cfg.patch_nums):
            (m,) = sown[si][f"blocks_{i}"]["attn"]["attn_mean"]
            means.append(m)
            counts.append(pn * pn)
            bits.append(a_bits)
    return means, counts, bits


def search(var_cfg, means, counts, bits, policy, alpha: float, n_grids: int):
    """θ for the budget α·(total BOPs of the policy). Returns (θ, note): when even the finest grid value is
    within budget (a small model), θ is that value and the note says so, where the reference would stop."""
    total = bops.total_bops(var_cfg, policy)
    try:
        return bops.search_theta(means, counts, total, bits, var_cfg.head_dim, alpha, n_grids), ""
    except ValueError as e:
        if "insufficient" not in str(e):
            raise
        return float(bops.theta_grid(n_grids)[0]), f"finest grid value taken ({e})"
