"""The quantized checkpoint: integer weight codes, their grids, the whole rule table — on top of `checkpoint.py`.

A quantized model is stored as a model checkpoint whose 'params' omit the kernels of the weight-quantized Linears;
item 'codes' holds those as packed integer codes (two per byte at ≤ 4 bits), item 'quant' the quantization state
without AdaRound α (scales, zero points, activation-quantizer state, θ), and metadata 'quantized' the policy's rule
table (with every quantizer it names) and each coded site's bits and shape. FP sites keep their float kernels.

Format versions: 2 (this one); 1 (written before the rule table: every Linear coded at the policy's global bits,
metadata 'quant_policy') still loads.
"""
import dataclasses
import os
from typing import Optional

import jax
import numpy as np
from flax import traverse_util

from varq_jax import checkpoint
from varq_jax.checkpoint import CheckpointError, ModelCheckpoint
from varq_jax.quant import state
from varq_jax.quant.policy import QuantPolicy

FORMAT = "varq-jax/quantized"
VERSION = 2
LOADER = "varq_jax.quant.load_quantized"


# --- storage of codes ------------------------------------------------------------------------------------------------
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


def export_codes(var_params: dict, quant: dict, policy: QuantPolicy):
    """(params without the coded kernels, {path: packed codes}, {path: {'bits', 'shape'}}) of a quantized VAR."""
    flat_p, flat_q = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(quant)
    rest, codes, sites = dict(flat_p), {}, {}
    for path in state.linear_paths(var_params):
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        coded = state.site_codes(path, flat_p[path + ("kernel",)], node, policy)
        if coded is None:
            continue
        kernel = rest.pop(path + ("kernel",))
        key = "/".join(path)
        codes[key] = pack_codes(np.asarray(coded[0]), coded[1])
        sites[key] = {"bits": coded[1], "shape": list(kernel.shape)}
    return traverse_util.unflatten_dict(rest), codes, sites


def import_codes(rest_params: dict, codes: dict, quant: dict, sites: dict) -> dict:
    """Inverse of `export_codes`: params whose coded Linear kernels are the dequantized ŵ."""
    flat = dict(traverse_util.flatten_dict(rest_params))
    flat_q = traverse_util.flatten_dict(quant)
    for key, packed in codes.items():
        path = tuple(key.split("/"))
        if key not in sites:
            raise CheckpointError(f"codes of {key!r} have no site record (bits, shape) in the metadata")
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        q = unpack_codes(np.asarray(packed), int(sites[key]["bits"]), tuple(sites[key]["shape"]))
        flat[path + ("kernel",)] = np.asarray(state.dequantize(q, node))
    return traverse_util.unflatten_dict(flat)


def linear_bytes(var_params: dict, quant: dict, policy: QuantPolicy) -> dict:
    """Bytes of the coded Linears as stored: {'codes', 'scales' (Δ, zero points, other grid state)}."""
    _, codes, sites = export_codes(var_params, quant, policy)
    flat_q = traverse_util.flatten_dict(state.without_alpha(quant))
    scale_bytes = sum(np.asarray(a).nbytes for p, a in flat_q.items() if "/".join(p[:-1]) in sites)
    return {"codes": int(sum(c.nbytes for c in codes.values())), "scales": int(scale_bytes)}


# --- save / load ---------------------------------------------------------------------------------------------------------
def save_quantized(path: str, ck: ModelCheckpoint, var_params: dict, quant: dict, policy: QuantPolicy, *,
                   meta: Optional[dict] = None, overwrite: bool = False) -> str:
    """Writes the quantized model (see the module doc) atomically; `policy.phase` says which rounding the codes
    hold (hard: AdaRound's learned rounding where α exists)."""
    if policy.phase == "soft":
        raise ValueError("a quantized checkpoint stores hard codes: save with phase 'hard' or 'nearest', not 'soft'")
    rest, codes, sites = export_codes(var_params, quant, policy)
    stored = dataclasses.replace(policy, phase="nearest", weights_prequantized=False, prefix="",
                                 observe_acts=False, report_errors=False)        # the codes hold the rounding
    omitted = [f"var/{k}/kernel" for k in codes]
    record = {"format": FORMAT, "version": VERSION, "policy": stored.to_dict(), "sites": sites}
    meta = {**(meta or {}), "loader": LOADER, "omitted_params": omitted, "quantized": record}
    return checkpoint.save(path, ck.vae_cfg, ck.var_cfg, {"vae": ck.params["vae"], "var": rest}, meta=meta,
                           items={"quant": state.without_alpha(quant),
                                  "codes": {k.replace("/", "."): v for k, v in codes.items()}},
                           overwrite=overwrite)


def is_quantized(meta: dict) -> bool:
    return "quantized" in meta or "quant_policy" in meta


def policy_from_meta(meta: dict) -> QuantPolicy:
    """The stored rule table as a policy (ValueError naming an unregistered quantizer)."""
    if "quantized" in meta:
        record = meta["quantized"]
        if record.get("format") != FORMAT or record.get("version", 0) > VERSION:
            raise CheckpointError(f"quantized format {record.get('format')!r} v{record.get('version')} is not "
                                  f"readable by this version (expected {FORMAT!r} ≤ v{VERSION})")
        return QuantPolicy.from_dict(record["policy"])
    return QuantPolicy.from_dict(meta["quant_policy"])            # version 1: the global fields


def _legacy_sites(meta: dict, policy: QuantPolicy) -> dict:
    """Version 1 coded every Linear at the policy's global weight bits."""
    from varq_jax.models.var import VARConfig
    from varq_jax.models.zoo import config_from_dict
    from varq_jax.quant import rules
    var_cfg = config_from_dict(VARConfig, meta["var"])
    return {s.path: {"bits": policy.w_bits, "shape": [s.in_features, s.out_features]}
            for s in rules.model_sites(var_cfg) if s.kind == rules.LINEAR}


def load_quantized(path: str, *, sharding=None, allow_nonfinite: bool = False,
                   execution: str = "simulate") -> ModelCheckpoint:
    """A quantized checkpoint with its coded kernels dequantized (ŵ) in `params`, the state in `.quant` and the
    rule table in `.policy` (phase nearest: the codes already hold the learned rounding). execution='int': the
    integer model instead (`execution.from_coded`: coded Linears as integer codes in `.quant`, no float kernels;
    `.policy` its `IntegerPolicy`)."""
    from varq_jax.quant import execution as execution_lib
    if execution not in execution_lib.EXECUTIONS:
        raise ValueError(f"execution must be one of {execution_lib.EXECUTIONS}, got {execution!r}")
    meta = checkpoint.read_metadata(path)
    if not is_quantized(meta):
        raise CheckpointError(f"{path!r} is a full-precision checkpoint, not a quantized one")
    try:
        policy = policy_from_meta(meta)
    except ValueError as e:
        raise CheckpointError(f"{path!r}: {e}") from e
    if "quantized" in meta:
        sites, omitted = meta["quantized"]["sites"], meta["omitted_params"]
    else:
        sites = _legacy_sites(meta, policy)
        omitted = [f"var/{k}/kernel" for k in sites]
    ck = checkpoint.restore(path, meta, omitted=omitted, allow_nonfinite=allow_nonfinite)
    codes = {k.replace(".", "/"): v for k, v in ck.items.pop("codes").items()}
    missing = sorted(set(sites) - set(codes))
    if missing:
        raise CheckpointError(f"{path!r} lacks the integer codes of {', '.join(missing)}")
    dtype = np.dtype("bfloat16") if meta.get("dtype") == "bfloat16" else np.dtype("float32")
    quant = ck.items["quant"]
    if execution == "int":
        policy = execution_lib.IntegerPolicy.of(policy).check(ck.var_cfg)
        coded = {tuple(k.split("/")): unpack_codes(np.asarray(c), int(sites[k]["bits"]), tuple(sites[k]["shape"]))
                 for k, c in codes.items()}
        rest = jax.tree.map(lambda a: np.asarray(a, dtype), ck.params["var"])
        var_params, quant = execution_lib.from_coded(rest, coded, quant, policy)
        quant = jax.tree.map(np.asarray, quant)
    else:
        var_params = import_codes(ck.params["var"], codes, quant, sites)
        var_params = jax.tree.map(lambda a: np.asarray(a, dtype), var_params)
    params = {"vae": ck.params["vae"], "var": var_params}
    if sharding is not None:
        params = jax.device_put(params, sharding)
    ck.params, ck.policy, ck.quant = params, policy, quant
    return ck


def load_any(path: str, **kwargs) -> ModelCheckpoint:
    """A model checkpoint, quantized or not."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if is_quantized(checkpoint.read_metadata(path)):
        return load_quantized(path, **kwargs)
    if kwargs.pop("execution", "simulate") != "simulate":
        raise CheckpointError(f"{path!r} is a full-precision checkpoint: integer execution needs a quantized one "
                              f"(python -m experiments.quantize writes it)")
    return checkpoint.load(path, **kwargs)
