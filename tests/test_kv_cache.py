"""The stacked KV cache of the scanned sampler against the per-block cache of the unrolled forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax.models import stack
from varq_jax.models.var import KVCache, VARConfig

CFG = VARConfig(depth=3, width=64, heads=4, patch_nums=(1, 2, 3, 4))
B = 2


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_stacked_cache_matches_per_block_cache(dtype, tol):
    rng = np.random.default_rng(0)
    kc, vc = stack.init_stacked_cache(CFG, B, dtype)
    blocks = [KVCache(*(jnp.zeros((B, CFG.L, CFG.heads, CFG.head_dim), dtype) for _ in range(2)))
              for _ in range(CFG.depth)]
    attend = jax.jit(lambda c, q, k, v, start: c.attend(q, k, v, start, 0.3), static_argnums=4)
    for start, end in CFG.begin_ends:
        for i in range(CFG.depth):
            q, k, v = (jnp.asarray(rng.normal(size=(B, end - start, CFG.heads, CFG.head_dim)), dtype)
                       for _ in range(3))
            want, blocks[i] = attend(blocks[i], q, k, v, start)
            got, view = attend(stack.StackedKVCache(kc, vc, jnp.int32(i)), q, k, v, start)
            kc, vc = view.k, view.v
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    for i in range(CFG.depth):     # block i's keys and values sit at [i] of the stacked buffers
        np.testing.assert_array_equal(np.asarray(kc[i], np.float32), np.asarray(blocks[i].k, np.float32))
        np.testing.assert_array_equal(np.asarray(vc[i], np.float32), np.asarray(blocks[i].v, np.float32))


def test_stacked_cache_never_reads_beyond_the_visible_prefix():
    """Garbage in the not-yet-written positions and in other blocks must not change the output."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(B, 4, CFG.heads, CFG.head_dim)), jnp.float32) for _ in range(3))
    clean = stack.init_stacked_cache(CFG, B, jnp.float32)
    dirty = tuple(jnp.full_like(c, 1e4) for c in clean)
    start = CFG.begin_ends[2][0] - 4
    outs = [stack.StackedKVCache(*c, jnp.int32(1)).attend(q, k, v, start, 0.3)[0] for c in (clean, dirty)]
    prefix = [c.at[1, :, :start].set(0.0) for c in dirty]
    out_dirty_prefix_zeroed = stack.StackedKVCache(*prefix, jnp.int32(1)).attend(q, k, v, start, 0.3)[0]
    np.testing.assert_allclose(np.asarray(out_dirty_prefix_zeroed), np.asarray(outs[0]), atol=1e-6)
    assert not np.allclose(np.asarray(outs[1]), np.asarray(outs[0]))   # the visible prefix is read
