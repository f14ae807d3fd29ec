"""The VAR blocks as one `lax.scan` over stacked per-block parameters, for the KV-cached sampler.

Unrolling depth × scales block copies makes XLA compile minutes for d16/d30; scanning the blocks compiles one
block per scale. The cache is one [depth, B, L, H, D] buffer per k and v, updated in place; each block writes
its keys once and reads exactly its visible prefix. The per-block modules are the same `AdaLNBlock`s; their
params/quant trees and module paths are relative to the block, so a quantization policy is bound to the blocks
of a scan (the sampler scans runs of blocks whose rules resolve alike).
"""
import functools

import flax
import jax
import jax.numpy as jnp

from varq_jax.models.var import AdaLNBlock, VARConfig, attend_visible

Array = jax.Array


def stack_blocks(tree: dict, blocks) -> dict:
    """{'blocks_0': t₀, …} → the subtrees of the given blocks (an int: the first that many) on a leading axis."""
    blocks = range(blocks) if isinstance(blocks, int) else blocks
    return jax.tree.map(lambda *a: jnp.stack(a), *[tree[f"blocks_{i}"] for i in blocks])


def unstack_blocks(tree, blocks) -> dict:
    """Inverse of `stack_blocks`: {'blocks_i': row j} for the j-th of the given blocks."""
    blocks = range(blocks) if isinstance(blocks, int) else blocks
    return {f"blocks_{i}": jax.tree.map(lambda a: a[j], tree) for j, i in enumerate(blocks)}


def init_stacked_cache(cfg: VARConfig, batch: int, dtype) -> tuple:
    shape = (cfg.depth, batch, cfg.L, cfg.heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


@flax.struct.dataclass
class StackedKVCache:
    """Block `block`'s view of the stacked [depth, B, L, H, D] key/value buffers (the `KVCache` protocol)."""
    k: Array
    v: Array
    block: Array

    def attend(self, q: Array, k: Array, v: Array, start: int, scale: float, policy_attend=None):
        at = (self.block, 0, start, 0, 0)
        k_all = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at)
        v_all = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at)
        end = start + q.shape[1]
        visible = lambda a: jax.lax.dynamic_index_in_dim(a, self.block, keepdims=False)[:, :end]
        out = attend_visible(q, visible(k_all), visible(v_all), scale, policy_attend)
        return out, StackedKVCache(k_all, v_all, self.block)


def _variables(params, quant) -> dict:
    return {"params": params, **({"quant": quant} if quant is not None else {})}


def scan_blocks(cfg: VARConfig, dtype, policy, block_params, block_quant, x, six, cache, start: int,
                collect: bool = False, first: int = 0):
    """The stacked blocks first, first + 1, … on the tokens x [B, n, C] at positions [start, start + n), with
    their modulations six [blocks, B, 6, C] (`VAR.block_modulations`, stacked); the cache holds every block.
    Returns (x, cache, sown), where sown holds the blocks' 'intermediates' stacked (empty unless `collect`).
    `policy` sees block-relative paths: bind it to the blocks (`QuantPolicy.bind`, `sampling.block_runs`)."""
    block = AdaLNBlock(cfg, dtype, policy)

    def body(carry, xs):
        h, kc, vc = carry
        p, q, m, i = xs
        view = StackedKVCache(kc, vc, i)
        apply = functools.partial(block.apply, _variables(p, q), h, m, view, start, method=AdaLNBlock.modulated)
        if collect:
            (h, view), sown = apply(mutable=["intermediates"])
            sown = sown.get("intermediates", {})
        else:
            (h, view), sown = apply(), {}
        return (h, view.k, view.v), sown

    carry = (x.astype(jnp.float32), *cache)      # the residual stream stays float32
    n = six.shape[0]
    (x, kc, vc), sown = jax.lax.scan(body, carry, (block_params, block_quant, six, jnp.arange(first, first + n)))
    return x, (kc, vc), sown
