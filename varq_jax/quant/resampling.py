"""Calibration data resampling of Shift-and-Sum (reference/SHIFT_AND_SUM.md §5), as jittable jnp.

Per scale, the calibration tokens are hard-reassigned so that each code's count equals its target
(floor(n·p̄) plus largest remainders, p̄ = mean predicted probability over samples and positions). For every
over-represented code, in increasing code order, its positions are ranked by the probability mass they put on
the codes still under target *at that moment*, and the top `excess` positions are redrawn one at a time from
their distribution restricted to the codes still under target (uniform over those codes when that mass is 0).

This is the official loop, not an approximation of it: positions are grouped by code with one stable sort,
and nested `fori_loop`s run over the over-represented codes (increasing), then score that code's positions
against the under-represented set as it stands when the code's turn comes, then make its `excess` redraws.
Differences that remain, all unavoidable or deliberate:
  * Random draws use JAX keys: the draw at flattened position i (= sample·P + position) uses
    `fold_in(key, i)` and inverse-CDF sampling on one uniform; the official code uses `torch.multinomial` with
    one torch generator per calibration sample. Same distribution, different numbers.
  * Ties in the ranking go to the lowest flattened position (the official `torch.argsort` does not promise an
    order); ties in the largest-remainder step go to the lowest code (`torch.topk` does not promise one).
  * If float rounding makes Σ floor(n·p̄) exceed n (possible only when Σp̄ rounds above 1), the surplus is taken
    back from the codes with the smallest fractional parts; the official code leaves it, and its counts
    then cannot all reach their targets.
  * Sums (p̄, the ranking mass) are float32 reductions in XLA's order, so a value sitting exactly on a floor or
    tie boundary may fall on the other side than in PyTorch.

Cost: besides the [n, V] probabilities themselves (a reshape, not a copy), the largest intermediates are
[n]-sized (ranking buffer, position order) and one [block, V] gather; no [n, V] temporary is built. Scoring
reads each over-represented position's row once; each redraw costs O(V + n/block + block).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Rows gathered at once when scoring the positions of one over-represented code.
_SCORE_BLOCK = 32


def target_counts(prob_mean: jax.Array, n_total: int) -> jax.Array:
    """Integer counts summing to `n_total` that follow `prob_mean` [V] (largest-remainder rounding).

    floor(n·p̄_v) for every code; the remainder n − Σ floor goes one each to the codes with the largest
    fractional parts n·p̄_v − floor(n·p̄_v), ties to the lower code index. A negative remainder (float
    rounding only) removes one each from the codes with the smallest fractional parts among those with
    floor ≥ 1, ties to the lower code index. Computed in float32 like the reference. Returns int32 [V].
    """
    if prob_mean.ndim != 1:
        raise ValueError(f"prob_mean must be 1-D [V], got shape {prob_mean.shape}")
    if not isinstance(n_total, (int, np.integer)) or n_total < 0:
        raise ValueError(f"n_total must be a non-negative Python int, got {n_total!r}")
    scaled = prob_mean.astype(jnp.float32) * jnp.float32(n_total)
    floors = jnp.floor(scaled)
    fractional = scaled - floors
    base = floors.astype(jnp.int32)
    remainder = jnp.int32(n_total) - base.sum()
    num_codes = prob_mean.shape[0]
    ranks = jnp.arange(num_codes, dtype=jnp.int32)
    # Stable sorts: equal fractional parts keep code order, so the lower code wins a tie.
    rank_largest = jnp.zeros(num_codes, jnp.int32).at[
        jnp.argsort(fractional, descending=True, stable=True)].set(ranks)
    removable = jnp.where(base > 0, fractional, jnp.inf)
    rank_smallest = jnp.zeros(num_codes, jnp.int32).at[jnp.argsort(removable, stable=True)].set(ranks)
    add = (rank_largest < remainder).astype(jnp.int32)
    take = (rank_smallest < -remainder).astype(jnp.int32)
    return base + add - take


def _first_argmax(x: jax.Array) -> jax.Array:
    """Index of the first maximum of a 1-D array (XLA's CPU argmax is ~30x slower than two reductions)."""
    iota = jnp.arange(x.shape[0], dtype=jnp.int32)
    return jnp.min(jnp.where(x == jnp.max(x), iota, x.shape[0]))


def _draw_index(key: jax.Array, weights: jax.Array) -> jax.Array:
    """One index drawn with probability ∝ weights [V] (≥ 0, not all 0), by inverse CDF on one uniform.

    The result always has weight > 0, even where float rounding of the cumulative sum is not monotone:
    it is the first positive-weight index whose cumulative weight exceeds u·total, else the last one.
    """
    num = weights.shape[0]
    iota = jnp.arange(num, dtype=jnp.int32)
    cumulative = jnp.cumsum(weights)
    threshold = jax.random.uniform(key, dtype=jnp.float32) * cumulative[-1]
    positive = weights > 0
    first = jnp.min(jnp.where(positive & (cumulative > threshold), iota, num))
    last_positive = jnp.max(jnp.where(positive, iota, -1))
    return jnp.where(first < num, first, last_positive).astype(jnp.int32)


def _check_scale_inputs(tokens, probs) -> tuple[jax.Array, jax.Array]:
    """Shape/dtype checks always; value checks when the arrays are concrete (not traced)."""
    tokens, probs = jnp.asarray(tokens), jnp.asarray(probs)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, P], got shape {tokens.shape}")
    if probs.ndim != 3 or probs.shape[:2] != tokens.shape:
        raise ValueError(f"probs must be [N, P, V] with [N, P] = tokens.shape {tokens.shape}, got {probs.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer codes, got dtype {tokens.dtype}")
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise ValueError(f"probs must be floating point, got dtype {probs.dtype}")
    if probs.shape[-1] < 1 or tokens.size == 0:
        raise ValueError(f"empty input: tokens {tokens.shape}, probs {probs.shape}")
    if isinstance(tokens, jax.core.Tracer) or isinstance(probs, jax.core.Tracer):
        return tokens, probs
    tok_min, tok_max, p_min, worst_row_error = (float(x) for x in _value_summary(tokens, probs))
    num_codes = probs.shape[-1]
    if tok_min < 0 or tok_max >= num_codes:
        raise ValueError(f"tokens must lie in [0, {num_codes}), got range [{tok_min:.0f}, {tok_max:.0f}]")
    if not worst_row_error <= 1e-3:  # also catches NaN/inf anywhere in a row
        raise ValueError(f"probs rows must be finite and sum to 1; the worst row is off by {worst_row_error:.3g}")
    if p_min < 0:
        raise ValueError(f"probs must be non-negative, got a minimum of {p_min:.3g}")
    return tokens, probs


@jax.jit
def _value_summary(tokens, probs):
    row_error = jnp.abs(probs.astype(jnp.float32).sum(-1) - 1.0)
    return tokens.min(), tokens.max(), probs.min(), jnp.max(row_error)


def resample_scale(key: jax.Array, tokens: jax.Array, probs: jax.Array) -> jax.Array:
    """Resampled tokens [N, P] int32 of one scale; every code's count then equals `target_counts`.

    Args:
      key: PRNG key of this scale.
      tokens: [N, P] integer codes drawn from `probs`.
      probs: [N, P, V] probabilities (after top-k/top-p masking) each row summing to 1.
    """
    tokens, probs = _check_scale_inputs(tokens, probs)
    return _resample_scale(key, tokens, probs)[0]


def resample_scale_with_trace(key: jax.Array, tokens: jax.Array, probs: jax.Array):
    """`resample_scale` plus the redraws in the order they happened, for audits and tests.

    Returns (new_tokens [N, P], trace) with trace a dict: 'target' [V] the target counts, 'num_draws' the
    number of redraws, 'positions' and 'codes' [N·P] whose entry j < num_draws is the j-th redraw
    (flattened position sample·P + position, new code); entries from num_draws on are −1.
    """
    tokens, probs = _check_scale_inputs(tokens, probs)
    return _resample_scale(key, tokens, probs)


@jax.jit
def _resample_scale(key, tokens, probs):
    num_samples, num_pos, num_codes = probs.shape
    n = num_samples * num_pos
    flat_tokens = tokens.reshape(n).astype(jnp.int32)
    flat_probs = probs.reshape(n, num_codes)

    target = target_counts(jnp.mean(flat_probs, axis=0, dtype=jnp.float32), n)
    counts = jnp.bincount(flat_tokens, length=num_codes)
    excess = jnp.maximum(counts - target, 0)
    shortage0 = jnp.maximum(target - counts, 0)

    # Positions grouped by code; within a code in flattened (sample, position) order.
    by_code = jnp.argsort(flat_tokens, stable=True).astype(jnp.int32)
    code_start = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    num_over = jnp.sum(excess > 0)
    over_codes = jnp.nonzero(excess > 0, size=num_codes, fill_value=0)[0]  # increasing code order

    # Ranking buffer of the current code: slot i = block·b + j holds the mass of its i-th position, with a
    # running max per block so that picking the best remaining slot costs O(n/block + block), not O(n).
    block = _SCORE_BLOCK
    num_blocks = -(-n // block)
    offsets = jnp.arange(block, dtype=jnp.int32)

    def score_positions(code, under, scores):
        """Mass each position of `code` puts on the `under` codes, in blocks 0..ceil(count/block)-1."""
        start, count = code_start[code], counts[code]

        def score_block(b, buffers):
            scores, block_max = buffers
            slot = b * block + offsets
            pos = by_code[jnp.minimum(start + slot, n - 1)]
            rows = flat_probs[pos].astype(jnp.float32)
            mass = jnp.where(slot < count, jnp.where(under[None, :], rows, 0.0).sum(-1), -jnp.inf)
            return scores.at[b].set(mass), block_max.at[b].set(jnp.max(mass))

        # Blocks past the code's last one keep stale scores, but their block max of -inf hides them.
        no_blocks = jnp.full(num_blocks, -jnp.inf, jnp.float32)
        return jax.lax.fori_loop(0, (count + block - 1) // block, score_block, (scores, no_blocks))

    def redraw(code, state):
        """Redraw the top-`excess` positions of one over-represented code, best-ranked first."""
        toks, shortage, scores, log_pos, log_code, num_drawn = state
        scores, block_max = score_positions(code, shortage > 0, scores)

        def draw_one(_, carry):
            toks, shortage, scores, block_max, log_pos, log_code, num_drawn = carry
            # First maximum overall (ties go to the lowest flattened position): first best block, then
            # first best slot in it.
            b = _first_argmax(block_max)
            j = _first_argmax(scores[b])
            pos = by_code[code_start[code] + b * block + j]
            row = scores[b].at[j].set(-jnp.inf)
            scores, block_max = scores.at[b].set(row), block_max.at[b].set(jnp.max(row))

            under = shortage > 0
            weights = jnp.where(under, flat_probs[pos].astype(jnp.float32), 0.0)
            weights = jnp.where(jnp.sum(weights) > 0, weights, under.astype(jnp.float32))
            new_code = _draw_index(jax.random.fold_in(key, pos), weights)
            return (toks.at[pos].set(new_code), shortage.at[new_code].add(-1), scores, block_max,
                    log_pos.at[num_drawn].set(pos), log_code.at[num_drawn].set(new_code), num_drawn + 1)

        toks, shortage, scores, _, log_pos, log_code, num_drawn = jax.lax.fori_loop(
            0, excess[code], draw_one, (toks, shortage, scores, block_max, log_pos, log_code, num_drawn))
        return toks, shortage, scores, log_pos, log_code, num_drawn

    def per_over_code(i, state):
        return redraw(over_codes[i], state)

    no_draws = jnp.full(n, -1, jnp.int32)
    scores = jnp.full((num_blocks, block), -jnp.inf, jnp.float32)
    new_tokens, _, _, log_pos, log_code, num_drawn = jax.lax.fori_loop(
        0, num_over, per_over_code, (flat_tokens, shortage0, scores, no_draws, no_draws, jnp.int32(0)))
    trace = dict(target=target, num_draws=num_drawn, positions=log_pos, codes=log_code)
    return new_tokens.reshape(num_samples, num_pos), trace


def resample_scales(key: jax.Array, tokens_per_scale: Sequence[jax.Array],
                    probs_per_scale: Sequence[jax.Array]) -> list[jax.Array]:
    """`resample_scale` on every scale, with key `fold_in(key, scale_index)` for scale `scale_index`."""
    if len(tokens_per_scale) != len(probs_per_scale):
        raise ValueError(f"{len(tokens_per_scale)} token maps but {len(probs_per_scale)} probability tensors")
    checked = [_check_scale_inputs(tokens, probs) for tokens, probs in zip(tokens_per_scale, probs_per_scale)]
    return [_resample_scale(jax.random.fold_in(key, s), tokens, probs)[0]
            for s, (tokens, probs) in enumerate(checked)]


def frequency_mismatch(tokens: jax.Array, probs: jax.Array) -> jax.Array:
    """Total variation distance between code frequencies counts/n and mean predicted probabilities p̄.

    0.5·Σ_v |count_v/n − p̄_v| over one scale's [N, P] tokens and [N, P, V] probs: the gap resampling closes
    (after it, only the rounding of n·p̄ to integer counts is left: below V/(2n)).
    """
    tokens, probs = _check_scale_inputs(tokens, probs)
    return _frequency_mismatch(tokens, probs)


@jax.jit
def _frequency_mismatch(tokens, probs):
    num_codes = probs.shape[-1]
    prob_mean = jnp.mean(probs.reshape(-1, num_codes), axis=0, dtype=jnp.float32)
    freq = jnp.bincount(tokens.reshape(-1).astype(jnp.int32), length=num_codes) / tokens.size
    return 0.5 * jnp.abs(freq - prob_mean).sum()


def frequency_mismatch_per_scale(tokens_per_scale: Sequence[jax.Array],
                                 probs_per_scale: Sequence[jax.Array]) -> np.ndarray:
    """`frequency_mismatch` of every scale, as a float numpy array [num_scales]."""
    if len(tokens_per_scale) != len(probs_per_scale):
        raise ValueError(f"{len(tokens_per_scale)} token maps but {len(probs_per_scale)} probability tensors")
    return np.array([float(frequency_mismatch(t, p)) for t, p in zip(tokens_per_scale, probs_per_scale)])
