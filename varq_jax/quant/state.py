"""The 'quant' variable collection of a quantized VAR, as pure functions over the params tree.

Every Linear whose rule quantizes weights gets its grid from the rule's registered weight quantizer ('delta',
'zero_point', and whatever else the quantizer keeps) at the rule's bits and granularity, and, once AdaRound starts,
'alpha'; a Linear whose input quantizer keeps calibrated state gets it under 'act'; every attention module its
shift-and-sum threshold 'theta'. Sites whose rule keeps weights in full precision get no weight state.
"""
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from varq_jax.quant import quantizers, registry

INITIAL_THETA = 1.0     # the official QuantMatMul's θ before the search: every order is 0


def linear_paths(var_params) -> list:
    """Paths (tuples) of every Linear: a params node holding a 2-D 'kernel'."""
    flat = traverse_util.flatten_dict(var_params)
    return sorted(p[:-1] for p, a in flat.items() if p[-1] == "kernel" and np.ndim(a) == 2)


def attention_paths(var_params) -> list:
    flat = traverse_util.flatten_dict(var_params)
    return sorted({p[:-2] for p in flat if len(p) >= 2 and p[-2] == "mat_qkv"})


def site_name(path: tuple) -> str:
    return path[-1] if path else ""


def init_quant_state(var_params, policy, theta: float = INITIAL_THETA) -> dict:
    """Weight grids of every weight-quantized Linear, activation-quantizer state where declared, the initial θ of
    every attention — each at its site's rule (pure, jittable)."""
    flat = traverse_util.flatten_dict(var_params)
    out = {}
    for path in linear_paths(var_params):
        rule = policy.rule_for("/".join(path))
        kernel = flat[path + ("kernel",)]
        if rule.weights:
            group = rule.weight_group(kernel.shape[0])
            grid = registry.weight_quantizer(rule.weight_quantizer).init(kernel, rule.w_bits, group)
            if "delta" not in grid or "zero_point" not in grid:
                raise ValueError(f"weight quantizer {rule.weight_quantizer!r} must return 'delta' and 'zero_point'")
            for k, v in grid.items():
                out[path + (k,)] = v
        if rule.acts:
            name, group = rule.act_spec(site_name(path), kernel.shape[0])
            q = registry.act_quantizer(name)
            if q.stateful:
                for k, v in traverse_util.flatten_dict({"act": q.init_state(kernel.shape[0], rule.a_bits, group)}).items():
                    out[path + k] = jnp.asarray(v)
    for path in attention_paths(var_params):
        out[path + ("theta",)] = jnp.asarray(theta, jnp.float32)
    return traverse_util.unflatten_dict(out)


def set_theta(quant: dict, theta) -> dict:
    flat = traverse_util.flatten_dict(quant)
    return traverse_util.unflatten_dict({p: (jnp.asarray(theta, jnp.float32) if p[-1] == "theta" else a)
                                         for p, a in flat.items()})


def get_theta(quant: dict) -> float:
    thetas = {float(a) for p, a in traverse_util.flatten_dict(quant).items() if p[-1] == "theta"}
    return thetas.pop() if len(thetas) == 1 else float("nan")


def map_linears(var_params, quant, fn: Callable) -> dict:
    """params with fn(path, kernel, quant node) applied to every Linear kernel."""
    flat_p, flat_q = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(quant)
    out = dict(flat_p)
    for path in linear_paths(var_params):
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        out[path + ("kernel",)] = fn(path, flat_p[path + ("kernel",)], node)
    return traverse_util.unflatten_dict(out)


def integer_codes(kernel, node: dict, bits: int, learned: bool = True):
    """The integer weight codes q ∈ [0, 2^bits − 1] that ŵ = (q − zp)·Δ dequantizes: nearest, or hard AdaRound
    where `learned` and the node holds α."""
    n = 2 ** quantizers.check_bits(bits)
    delta, zp = node["delta"], node["zero_point"]
    g = kernel.astype(jnp.float32).reshape((delta.shape[0], -1, kernel.shape[1]) if delta.ndim == 3 else kernel.shape)
    if not learned or "alpha" not in node:
        q = jnp.round(g / delta)
    else:
        q = jnp.floor(g / delta) + (node["alpha"].reshape(g.shape) >= 0)
    return jnp.clip(q + zp, 0, n - 1).astype(jnp.uint8).reshape(kernel.shape)


def dequantize(codes, node: dict):
    delta, zp = node["delta"], node["zero_point"]
    g = codes.astype(jnp.float32).reshape((delta.shape[0], -1, codes.shape[1]) if delta.ndim == 3 else codes.shape)
    return ((g - zp) * delta).reshape(codes.shape)


def site_codes(path: tuple, kernel, node: dict, policy):
    """(codes, bits) of a Linear under the policy, or None where its rule keeps the weights in full precision."""
    rule = policy.rule_for("/".join(path))
    if not rule.weights:
        return None
    if "delta" not in node:
        raise ValueError(f"no weight grid for {'/'.join(path)} in the quant state (init_quant_state builds it)")
    learned = rule.rounding == "adaround" and policy.phase != "nearest"
    return integer_codes(kernel, node, rule.w_bits, learned), rule.w_bits


def materialize_weights(var_params, quant: dict, policy) -> dict:
    """params whose quantized Linear kernels hold ŵ — each at its own rule's bits — for weights-prequantized
    inference: the weights are quantized once instead of at every call. FP sites keep their float kernels."""
    if policy.phase == "soft":
        raise ValueError("materialize_weights needs hard weights (phase nearest or hard, not soft)")

    def fn(path, kernel, node):
        coded = site_codes(path, kernel, node, policy)
        return kernel if coded is None else dequantize(coded[0], node).astype(kernel.dtype)
    return map_linears(var_params, quant, fn)


def without_alpha(quant: dict) -> dict:
    return traverse_util.unflatten_dict({p: a for p, a in traverse_util.flatten_dict(quant).items()
                                         if p[-1] != "alpha"})
