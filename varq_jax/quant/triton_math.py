"""Elementwise math the Pallas Triton lowering lacks, written with what it has (floor, compare, select)."""
import jax.numpy as jnp


def round_even(x):
    """jnp.round (half to even) of float32 x, exactly for every finite x (a float32 of magnitude ≥ 2²³ is an
    integer): Pallas' Triton lowering has no rule for lax.round, and the kernels must round as the quantizers do."""
    f = jnp.floor(x)
    d = x - f                                         # exact: below 2²³ both share the exponent range; above, 0
    odd = f - 2.0 * jnp.floor(0.5 * f) != 0.0
    return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
