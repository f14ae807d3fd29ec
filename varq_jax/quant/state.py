"""The 'quant' variable collection of a quantized VAR, as pure functions over the params tree.

For every Linear (a params node holding a 2-D 'kernel'): weight (delta, zero_point) from min-max at the
policy's granularity and, once AdaRound starts, 'alpha'. For every attention module: its shift-and-sum
threshold 'theta'. The same tree stores integer weight codes for checkpoints (W4 codes packed two per byte).
"""
import fnmatch
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from varq_jax.quant import quantizers
from varq_jax.quant.policy import QuantPolicy

INITIAL_THETA = 1.0     # the official QuantMatMul's θ before the search: every order is 0


def _linear_paths(var_params) -> list:
    flat = traverse_util.flatten_dict(var_params)
    return sorted(p[:-1] for p, a in flat.items() if p[-1] == "kernel" and np.ndim(a) == 2)


def _attention_paths(var_params) -> list:
    flat = traverse_util.flatten_dict(var_params)
    return sorted({p[:-2] for p in flat if len(p) >= 2 and p[-2] == "mat_qkv"})


def init_quant_state(var_params, policy: QuantPolicy, theta: float = INITIAL_THETA) -> dict:
    """Min-max weight parameters of every Linear and the initial θ of every attention (pure, jittable)."""
    flat = traverse_util.flatten_dict(var_params)
    out = {}
    for path in _linear_paths(var_params):
        kernel = flat[path + ("kernel",)]
        group = quantizers.weight_group_size(policy.w_bits, kernel.shape[0])
        delta, zp = quantizers.weight_minmax_params(kernel, policy.w_bits, group)
        out[path + ("delta",)], out[path + ("zero_point",)] = delta, zp
    for path in _attention_paths(var_params):
        out[path + ("theta",)] = jnp.asarray(theta, jnp.float32)
    return traverse_util.unflatten_dict(out)


def init_alpha(var_params, quant: dict) -> dict:
    """Adds AdaRound α (h(α) = fractional part of w/Δ) to every Linear's state."""
    flat_p, flat_q = traverse_util.flatten_dict(var_params), dict(traverse_util.flatten_dict(quant))
    for path in _linear_paths(var_params):
        flat_q[path + ("alpha",)] = quantizers.adaround_init_alpha(flat_p[path + ("kernel",)], flat_q[path + ("delta",)])
    return traverse_util.unflatten_dict(flat_q)


def set_theta(quant: dict, theta) -> dict:
    flat = traverse_util.flatten_dict(quant)
    return traverse_util.unflatten_dict({p: (jnp.asarray(theta, jnp.float32) if p[-1] == "theta" else a)
                                         for p, a in flat.items()})


def get_theta(quant: dict) -> float:
    thetas = {float(a) for p, a in traverse_util.flatten_dict(quant).items() if p[-1] == "theta"}
    return thetas.pop() if len(thetas) == 1 else float("nan")


def _map_linears(var_params, quant, fn: Callable) -> dict:
    """params with fn(path, kernel, quant_node) applied to every Linear kernel."""
    flat_p, flat_q = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(quant)
    out = dict(flat_p)
    for path in _linear_paths(var_params):
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        out[path + ("kernel",)] = fn(path, flat_p[path + ("kernel",)], node)
    return traverse_util.unflatten_dict(out)


def integer_codes(kernel, node: dict, policy: QuantPolicy):
    """The integer weight codes q ∈ [0, 2^bits − 1] that ŵ = (q − zp)·Δ dequantizes (nearest or hard AdaRound)."""
    n = 2 ** policy.w_bits
    delta, zp = node["delta"], node["zero_point"]
    g = kernel.astype(jnp.float32).reshape((delta.shape[0], -1, kernel.shape[1]) if delta.ndim == 3 else kernel.shape)
    if policy.rounding == "nearest" or "alpha" not in node:
        q = jnp.round(g / delta)
    else:
        q = jnp.floor(g / delta) + (node["alpha"].reshape(g.shape) >= 0)
    return jnp.clip(q + zp, 0, n - 1).astype(jnp.uint8).reshape(kernel.shape)


def dequantize(codes, node: dict):
    delta, zp = node["delta"], node["zero_point"]
    g = codes.astype(jnp.float32).reshape((delta.shape[0], -1, codes.shape[1]) if delta.ndim == 3 else codes.shape)
    return ((g - zp) * delta).reshape(codes.shape)


def materialize_weights(var_params, quant: dict, policy: QuantPolicy) -> dict:
    """params whose Linear kernels hold ŵ, for `policy.weights_prequantized` inference: the weights are quantized
    once instead of at every call. Modules in policy.fp_modules keep their float kernels."""
    if not policy.weights or policy.rounding == "soft":
        raise ValueError("materialize_weights needs hard weights (policy.weights on, rounding nearest or hard)")
    fp = lambda path: any(fnmatch.fnmatchcase("/".join(path), pat) for pat in policy.fp_modules)
    return _map_linears(var_params, quant, lambda path, k, node: k if fp(path) else
                        dequantize(integer_codes(k, node, policy), node).astype(k.dtype))


# --- storage -----------------------------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes → bytes: two per byte for ≤ 4 bits (W4 is ≈ 4× smaller than bf16), one per byte otherwise."""
    codes = np.asarray(codes, np.uint8).reshape(-1)
    if bits > 4:
        return codes
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, shape: tuple) -> np.ndarray:
    size = int(np.prod(shape))
    packed = np.asarray(packed, np.uint8)
    if bits > 4:
        return packed[:size].reshape(shape)
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    return out[:size].reshape(shape)


def linear_kernel_shapes(var_params) -> dict:
    flat = traverse_util.flatten_dict(var_params)
    return {"/".join(p): tuple(flat[p + ("kernel",)].shape) for p in _linear_paths(var_params)}


def without_linear_kernels(var_params) -> dict:
    drop = {p + ("kernel",) for p in _linear_paths(var_params)}
    return traverse_util.unflatten_dict({p: a for p, a in traverse_util.flatten_dict(var_params).items()
                                         if p not in drop})


def without_alpha(quant: dict) -> dict:
    return traverse_util.unflatten_dict({p: a for p, a in traverse_util.flatten_dict(quant).items()
                                         if p[-1] != "alpha"})


def export_quantized(var_params, quant: dict, policy: QuantPolicy):
    """(params without the quantized kernels, {path: packed codes}) — what a quantized checkpoint stores."""
    flat_p, flat_q = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(quant)
    rest, codes = dict(flat_p), {}
    for path in _linear_paths(var_params):
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        kernel = rest.pop(path + ("kernel",))
        codes["/".join(path)] = pack_codes(np.asarray(integer_codes(kernel, node, policy)), policy.w_bits)
    return traverse_util.unflatten_dict(rest), codes


def import_quantized(rest_params, codes: dict, quant: dict, policy: QuantPolicy, kernel_shapes: dict) -> dict:
    """Inverse of `export_quantized`: params whose Linear kernels are the dequantized ŵ."""
    flat = dict(traverse_util.flatten_dict(rest_params))
    flat_q = traverse_util.flatten_dict(quant)
    for key, packed in codes.items():
        path = tuple(key.split("/"))
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        q = unpack_codes(np.asarray(packed), policy.w_bits, tuple(kernel_shapes[key]))
        flat[path + ("kernel",)] = np.asarray(dequantize(jnp.asarray(q), node))
    return traverse_util.unflatten_dict(flat)
