"""The shipped form of a trained model: `params.msgpack` (Flax msgpack) + `info.json` (kind, config, metrics).

Kernels of layers that compute in bf16 are stored in bf16: run in bf16 (the training and sampling dtype) the model
casts them to bf16 before every matmul or conv anyway, so this halves the file without changing any output; run
in float32, the stored bf16 values are the model (the evaluations recorded in info.json use them). Biases,
norms, embedding tables and the float32 parts (the VQVAE's codebook, Phi and quant convs) stay float32.
"""
import dataclasses
import json
import os
from typing import Callable, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

PARAMS_FILE, INFO_FILE = "params.msgpack", "info.json"
VQVAE_FLOAT32_MODULES = ("quant_conv", "post_quant_conv", "embedding")   # plus every phi_*


def _names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def vqvae_keeps_float32(names: tuple) -> bool:
    return any(n in VQVAE_FLOAT32_MODULES or n.startswith("phi_") for n in names)


def cast_kernels(params, keep_float32: Callable[[tuple], bool] = lambda names: False):
    """NumPy copy of params with every ≥2-D 'kernel' in bf16 unless keep_float32(path names)."""
    def cast(path, leaf):
        names = _names(path)
        leaf = np.asarray(leaf)
        if names[-1] == "kernel" and leaf.ndim >= 2 and not keep_float32(names):
            return leaf.astype(jnp.bfloat16)
        return leaf.astype(np.float32) if leaf.dtype == jnp.bfloat16 else leaf
    return jax.tree_util.tree_map_with_path(cast, params)


def as_float32(params):
    """Stored params → float32 arrays, the form the training code and models consume."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def nbytes(params) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))


def save(directory: str, params, *, kind: str, config, meta: Optional[dict] = None) -> str:
    """Writes params (as given, e.g. from `cast_kernels`) and info.json; files are replaced atomically."""
    os.makedirs(directory, exist_ok=True)
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    info = {"kind": kind, "config": config_dict, "bytes": nbytes(params), "meta": meta or {}}
    blob = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
    for name, data, mode in ((PARAMS_FILE, blob, "wb"), (INFO_FILE, json.dumps(info, indent=1), "w")):
        tmp = os.path.join(directory, f".{name}.tmp")
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))
    return directory


def _config_classes() -> dict:
    from varq_jax.models.classifier import ClassifierConfig
    from varq_jax.models.var import VARConfig
    from varq_jax.models.vqvae import VQVAEConfig
    return {"vqvae": VQVAEConfig, "var": VARConfig, "classifier": ClassifierConfig}


def load_model(directory: str, kind: str):
    """(model config dataclass, float32 params, info) of an exported 'vqvae', 'var' or 'classifier'."""
    classes = _config_classes()
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(classes)}")
    params, info = load(directory, kind)
    cfg = classes[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()})
    return cfg, as_float32(params), info


def load(directory: str, kind: Optional[str] = None):
    """(params as stored, info dict); raises ValueError if missing or of another kind."""
    params_path, info_path = os.path.join(directory, PARAMS_FILE), os.path.join(directory, INFO_FILE)
    if not (os.path.isfile(params_path) and os.path.isfile(info_path)):
        raise ValueError(f"no exported model in {directory} (need {PARAMS_FILE} and {INFO_FILE})")
    with open(info_path) as f:
        info = json.load(f)
    if kind is not None and info.get("kind") != kind:
        raise ValueError(f"{directory} holds a {info.get('kind')!r} model, expected {kind!r}")
    with open(params_path, "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())
    return params, info
