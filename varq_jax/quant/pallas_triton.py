"""What the Pallas (Triton) kernels of quant/ share: tile sizes, compiler parameters, and elementwise math the
Triton lowering lacks, written with what it has (floor, compare, select)."""
import jax.numpy as jnp


def tile(n: int, widest: int) -> int:
    """The smallest power of two ≥ 16 (Triton's least dot size) covering n, at most `widest`."""
    t = 16
    while t < widest and t < n:
        t *= 2
    return t


def pallas_call_params(interpret: bool, num_warps: int, num_stages: int) -> dict:
    """pallas_call's compiler parameters for Triton (none in interpret mode, where no Triton is needed)."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def round_even(x):
    """jnp.round (half to even) of float32 x, exactly for every finite x (a float32 of magnitude ≥ 2²³ is an
    integer): Pallas' Triton lowering has no rule for lax.round, and the kernels must round as the quantizers do."""
    f = jnp.floor(x)
    d = x - f                                         # exact: below 2²³ both share the exponent range; above, 0
    odd = f - 2.0 * jnp.floor(0.5 * f) != 0.0
    return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
