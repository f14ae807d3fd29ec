"""Bit operations (BOPs) of the quantized VAR and the BOP-budgeted shift-and-sum threshold θ
(reference/SHIFT_AND_SUM.md §4; the official `compute_total_bitop` and `get_thres_with_bitop`).

Counts are per image of one KV-cached sampling pass. A Linear costs out·in·tokens·w_bits·a_bits summed over
the distinct token counts it sees; the AdaLN projections see one vector per scale. Each attention matmul costs
heads·s1·s2·head_dim·a_bits² per scale (s1 queries, s2 visible keys).
"""
from typing import List, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.quant import quantizers
from varq_jax.quant.quantizers import MAX_ORDER

Array = jax.Array

# Per-element costs the reference charges to shift-and-sum: a 16-bit mean over queries and count per key,
# MAX_ORDER + 1 comparisons per key, and per extra copy a 16-bit add per channel and one add per query.
_MEAN_BITS = 16
_ORDER_COMPARE_BITS = MAX_ORDER + 1


class LinearSite(NamedTuple):
    name: str
    in_features: int
    out_features: int
    token_counts: tuple     # distinct token counts the layer sees in one sampling pass
    multiplier: int         # times each count is seen (the number of scales for AdaLN projections)


def linear_sites(cfg) -> List[LinearSite]:
    """Every quantized Linear of a VARConfig with the inputs it sees during KV-cached sampling.

    As in the reference, token counts are the distinct values (a set), word_embed embeds scales 1..SN−1, and
    AdaLN projections (tokens = 1) are charged once per scale. With shared AdaLN, `shared_ada_lin` also runs once
    per scale and is charged so (the reference names it differently and would charge it once, but cannot run
    that model quantized).
    """
    c, scales = cfg.width, cfg.num_scales
    per_scale = tuple(sorted({pn * pn for pn in cfg.patch_nums}))
    next_inputs = tuple(sorted({pn * pn for pn in cfg.patch_nums[1:]}))
    sites = [LinearSite("word_embed", cfg.cvae, c, next_inputs, 1)]
    if cfg.shared_aln:
        sites.append(LinearSite("shared_ada_lin", c, 6 * c, (1,), scales))
    for i in range(cfg.depth):
        if not cfg.shared_aln:
            sites.append(LinearSite(f"blocks_{i}/ada_lin", c, 6 * c, (1,), scales))
        sites += [
            LinearSite(f"blocks_{i}/attn/mat_qkv", c, 3 * c, per_scale, 1),
            LinearSite(f"blocks_{i}/attn/proj", c, c, per_scale, 1),
            LinearSite(f"blocks_{i}/ffn/fc1", c, cfg.hidden, per_scale, 1),
            LinearSite(f"blocks_{i}/ffn/fc2", cfg.hidden, c, per_scale, 1),
        ]
    sites += [LinearSite("head_nm", c, 2 * c, (1,), scales),
              LinearSite("head", c, cfg.vocab_size, per_scale, 1)]
    return sites


def attention_pairs(cfg) -> List[tuple]:
    """(s1, s2) per scale: queries of the scale and the cached keys they see. The reference pairs the sorted
    distinct query counts with the sorted distinct key counts; for distinct patch sizes that is per scale."""
    queries = sorted({pn * pn for pn in cfg.patch_nums})
    keys = sorted({e for _, e in cfg.begin_ends})
    return list(zip(queries, keys))


def total_bops(cfg, w_bits: int, a_bits: int) -> int:
    """BOPs of the quantized transformer for one image: all quantized Linears plus QKᵀ and A·V per block."""
    quantizers.check_bits(w_bits)
    quantizers.check_bits(a_bits)
    linear = sum(s.out_features * s.in_features * t * w_bits * a_bits * s.multiplier
                 for s in linear_sites(cfg) for t in s.token_counts)
    per_matmul = sum(cfg.heads * s1 * s2 * a_bits ** 2 * cfg.head_dim for s1, s2 in attention_pairs(cfg))
    return int(linear + 2 * cfg.depth * per_matmul)


# ---------------------------------------------------------------------------------------------------------------
# Extra BOPs of shift-and-sum and the θ search
# ---------------------------------------------------------------------------------------------------------------
def _check_stats(attn_means: Sequence, query_counts: Sequence[int]):
    if len(attn_means) != len(query_counts) or not attn_means:
        raise ValueError(f"need one query count per attention mean; got {len(attn_means)} means and "
                         f"{len(query_counts)} counts")
    for m in attn_means:
        if np.ndim(m) != 3:
            raise ValueError(f"attention means must be [b, h, s2], got shape {np.shape(m)}")


def _fixed_bops(attn_means, query_counts) -> int:
    """θ-independent part: mean over queries, key counting and order comparisons, per image."""
    total = 0
    for m, s1 in zip(attn_means, query_counts):
        _, h, s2 = np.shape(m)
        total += h * s2 * (_MEAN_BITS * s1 + _MEAN_BITS + _ORDER_COMPARE_BITS)
    return total


def _copy_bops(s1: int, head_dim: int, a_bits: int) -> int:
    """BOPs of one extra shifted copy of one key (times the batch b; the caller divides by b)."""
    return s1 * head_dim * a_bits ** 2 + head_dim * _MEAN_BITS + s1


def sas_extra_bops(attn_means: Sequence, query_counts: Sequence[int], theta: float, a_bits: int,
                   head_dim: int) -> float:
    """Extra BOPs per image of shift-and-sum at threshold θ, from per-(block, scale) mean FP attention
    [b, h, s2] over the s1 queries of that scale: fixed costs plus, per extra copy N = Σ(2^n − 1),
    s1·head_dim·a² + 16·head_dim + s1; all divided by b."""
    _check_stats(attn_means, query_counts)
    quantizers.check_bits(a_bits)
    extra = 0.0
    for m, s1 in zip(attn_means, query_counts):
        orders = np.asarray(quantizers.shift_orders(np.asarray(m, np.float32), np.float32(theta)))
        copies = int(np.sum(2 ** orders - 1))
        extra += copies * _copy_bops(int(s1), head_dim, a_bits) / np.shape(m)[0]
    return _fixed_bops(attn_means, query_counts) + extra


def theta_grid(n_grids: int) -> np.ndarray:
    """linspace(1/G, 1, G) in float32 (each value correctly rounded; torch's linspace may differ by an ulp)."""
    if n_grids < 2:
        raise ValueError(f"n_grids must be at least 2, got {n_grids}")
    return np.linspace(1.0 / n_grids, 1.0, n_grids, dtype=np.float64).astype(np.float32)


@jax.jit
def _weighted_copies(sorted_means: Array, thetas: Array) -> Array:
    """[G, n_groups] int32: Σ over the group's elements of 2^n − 1 = [ā>θ] + 2[ā>2θ] + 4[ā>4θ], per θ.
    `sorted_means` [n_groups, M] ascending (zero padded; zeros never count)."""
    size = sorted_means.shape[1]

    def above(row, t):      # number of elements of a sorted row strictly above each t
        return size - jnp.searchsorted(row, t, side="right").astype(jnp.int32)

    total = jnp.zeros((thetas.shape[0], sorted_means.shape[0]), jnp.int32)
    for j in range(MAX_ORDER):
        limits = thetas * jnp.float32(2.0 ** j)
        total += (2 ** j) * jax.vmap(above, in_axes=(0, None), out_axes=1)(sorted_means, limits)
    return total


def sas_extra_bops_grid(attn_means: Sequence, query_counts: Sequence[int], thetas, a_bits: int,
                        head_dim: int) -> np.ndarray:
    """`sas_extra_bops` for every θ of `thetas` at once (float64 [G]): one jitted evaluation. Elements are
    grouped by (s1, b), which fixes the cost of a copy; within a group the copy count for all θ comes from
    one sort and binary searches, so G = 10,000 costs milliseconds."""
    _check_stats(attn_means, query_counts)
    quantizers.check_bits(a_bits)
    groups = {}
    for m, s1 in zip(attn_means, query_counts):
        m = np.asarray(m, np.float32)
        groups.setdefault((int(s1), m.shape[0]), []).append(m.ravel())
    keys = sorted(groups)
    flat = [np.concatenate(groups[k]) for k in keys]
    width = max(f.size for f in flat)
    padded = np.zeros((len(flat), width), np.float32)
    for row, f in zip(padded, flat):
        row[width - f.size:] = np.sort(f)
    copies = np.asarray(_weighted_copies(jnp.asarray(padded), jnp.asarray(thetas, jnp.float32)))
    cost = np.array([_copy_bops(s1, head_dim, a_bits) / b for s1, b in keys], np.float64)
    return _fixed_bops(attn_means, query_counts) + copies.astype(np.float64) @ cost


def search_theta(attn_means: Sequence, query_counts: Sequence[int], total: float, a_bits: int, head_dim: int,
                 alpha: float = 0.01, n_grids: int = 10_000) -> float:
    """The reference's θ: on linspace(1/G, 1, G), the number of candidates whose extra BOPs exceed α·total
    indexes the chosen θ (the smallest candidate within budget, extra BOPs falling with θ).

    ValueError when even the smallest candidate is within budget (the reference's assert: the grid is too
    coarse to resolve θ) or when no candidate is (the reference would index past the grid).
    """
    if not alpha > 0 or not total > 0:
        raise ValueError(f"alpha and total must be positive, got alpha={alpha}, total={total}")
    thetas = theta_grid(n_grids)
    extra = sas_extra_bops_grid(attn_means, query_counts, thetas, a_bits, head_dim)
    budget = alpha * total
    over = extra > budget
    if not over[0]:
        raise ValueError(f"insufficient n_grids or too high BOP budget: θ = 1/{n_grids} already costs "
                         f"{extra[0]:.4g} ≤ {budget:.4g} extra BOPs")
    index = int(over.sum())
    if index >= n_grids:
        raise ValueError(f"no θ ≤ 1 meets the budget: θ = 1 still costs {extra[-1]:.4g} > {budget:.4g} extra BOPs")
    return float(thetas[index])
