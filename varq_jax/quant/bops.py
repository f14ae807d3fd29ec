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


FP_BITS = 16     # a site its rule keeps in full precision is charged as a 16-bit operand (fp16 inference)


class SiteBops(NamedTuple):
    path: str
    kind: str            # linear | attention
    w_bits: int          # bits charged (FP_BITS where the rule keeps the operand in full precision)
    a_bits: int
    macs: int            # multiply-accumulates per image
    bops: int            # macs · w_bits · a_bits (attention: both matmuls, a_bits²)


def total_macs(cfg) -> int:
    """Multiply-accumulates per image of the transformer's matmuls (every Linear, QKᵀ and A·V)."""
    linear = sum(s.out_features * s.in_features * t * s.multiplier for s in linear_sites(cfg) for t in s.token_counts)
    per_matmul = sum(cfg.heads * s1 * s2 * cfg.head_dim for s1, s2 in attention_pairs(cfg))
    return int(linear + 2 * cfg.depth * per_matmul)


def site_bops(cfg, policy) -> List[SiteBops]:
    """BOPs of every site under the policy's rules: a Linear costs out·in·tokens·w_bits·a_bits summed over the token
    counts it sees, each attention matmul heads·s1·s2·head_dim·a_bits² per scale (16 bits where a rule keeps the
    operand in full precision)."""
    out = []
    attn_macs = sum(cfg.heads * s1 * s2 * cfg.head_dim for s1, s2 in attention_pairs(cfg))
    for s in linear_sites(cfg):
        r = policy.rule_for(s.name)
        macs = sum(s.out_features * s.in_features * t * s.multiplier for t in s.token_counts)
        wb, ab = (r.w_bits if r.weights else FP_BITS), (r.a_bits if r.acts else FP_BITS)
        out.append(SiteBops(s.name, "linear", wb, ab, int(macs), int(macs * wb * ab)))
        if s.name.endswith("/attn/mat_qkv"):
            path = s.name[:-len("/mat_qkv")]
            ra = policy.rule_for(path)
            ab = ra.a_bits if ra.attn else FP_BITS
            out.append(SiteBops(path, "attention", ab, ab, 2 * attn_macs, 2 * attn_macs * ab * ab))
    return out


def total_bops(cfg, policy) -> int:
    """BOPs of the quantized transformer for one image under the policy (`site_bops` summed)."""
    return int(sum(s.bops for s in site_bops(cfg, policy)))


# ---------------------------------------------------------------------------------------------------------------
# Extra BOPs of shift-and-sum and the θ search
# ---------------------------------------------------------------------------------------------------------------
def _check_stats(attn_means: Sequence, query_counts: Sequence[int], a_bits) -> list:
    """The per-mean activation bits (a_bits: one int for all, or one per attention mean)."""
    if len(attn_means) != len(query_counts) or not attn_means:
        raise ValueError(f"need one query count per attention mean; got {len(attn_means)} means and "
                         f"{len(query_counts)} counts")
    for m in attn_means:
        if np.ndim(m) != 3:
            raise ValueError(f"attention means must be [b, h, s2], got shape {np.shape(m)}")
    bits = [a_bits] * len(attn_means) if isinstance(a_bits, (int, np.integer)) else list(a_bits)
    if len(bits) != len(attn_means):
        raise ValueError(f"need one a_bits per attention mean; got {len(bits)} for {len(attn_means)}")
    return [quantizers.check_bits(int(b)) for b in bits]


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


def sas_extra_bops(attn_means: Sequence, query_counts: Sequence[int], theta: float, a_bits,
                   head_dim: int) -> float:
    """Extra BOPs per image of shift-and-sum at threshold θ, from per-(block, scale) mean FP attention
    [b, h, s2] over the s1 queries of that scale: fixed costs plus, per extra copy N = Σ(2^n − 1),
    s1·head_dim·a² + 16·head_dim + s1; all divided by b. a_bits: one int, or one per mean (mixed precision)."""
    bits = _check_stats(attn_means, query_counts, a_bits)
    extra = 0.0
    for m, s1, ab in zip(attn_means, query_counts, bits):
        orders = np.asarray(quantizers.shift_orders(np.asarray(m, np.float32), np.float32(theta)))
        copies = int(np.sum(2 ** orders - 1))
        extra += copies * _copy_bops(int(s1), head_dim, ab) / np.shape(m)[0]
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


def sas_extra_bops_grid(attn_means: Sequence, query_counts: Sequence[int], thetas, a_bits,
                        head_dim: int) -> np.ndarray:
    """`sas_extra_bops` for every θ of `thetas` at once (float64 [G]): one jitted evaluation. Elements are
    grouped by (s1, b, a_bits), which fixes the cost of a copy; within a group the copy count for all θ comes
    from one sort and binary searches, so G = 10,000 costs milliseconds."""
    bits = _check_stats(attn_means, query_counts, a_bits)
    groups = {}
    for m, s1, ab in zip(attn_means, query_counts, bits):
        m = np.asarray(m, np.float32)
        groups.setdefault((int(s1), m.shape[0], ab), []).append(m.ravel())
    keys = sorted(groups)
    flat = [np.concatenate(groups[k]) for k in keys]
    width = max(f.size for f in flat)
    padded = np.zeros((len(flat), width), np.float32)
    for row, f in zip(padded, flat):
        row[width - f.size:] = np.sort(f)
    copies = np.asarray(_weighted_copies(jnp.asarray(padded), jnp.asarray(thetas, jnp.float32)))
    cost = np.array([_copy_bops(s1, head_dim, ab) / b for s1, b, ab in keys], np.float64)
    return _fixed_bops(attn_means, query_counts) + copies.astype(np.float64) @ cost


def search_theta(attn_means: Sequence, query_counts: Sequence[int], total: float, a_bits, head_dim: int,
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
