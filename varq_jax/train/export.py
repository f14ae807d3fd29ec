"""The shipped form of a trained model: `params/` (an Orbax checkpoint) + `info.json` (kind, config, metrics).

Kernels of layers that compute in bf16 are stored in bf16: run in bf16 (the training and sampling dtype) the model
casts them to bf16 before every matmul or conv anyway, so this halves the file without changing any output; run
in float32, the stored bf16 values are the model (the evaluations recorded in info.json use them). Biases,
norms, embedding tables and the float32 parts (the VQVAE's codebook, Phi and quant convs) stay float32.
"""
import dataclasses
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR, INFO_FILE = "params", "info.json"
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
    """Writes params (as given, e.g. from `cast_kernels`) and info.json into a temporary sibling directory that
    replaces `directory` only when complete."""
    from varq_jax.files import atomic_directory
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    info = {"kind": kind, "config": config_dict, "bytes": nbytes(params), "meta": meta or {}}
    with atomic_directory(directory, overwrite=True) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(os.path.abspath(tmp), PARAMS_DIR), jax.tree.map(np.asarray, params))
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
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
    params_path, info_path = os.path.join(directory, PARAMS_DIR), os.path.join(directory, INFO_FILE)
    if not (os.path.isdir(params_path) and os.path.isfile(info_path)):
        raise ValueError(f"no exported model in {directory} (need {PARAMS_DIR}/ and {INFO_FILE})")
    with open(info_path) as f:
        info = json.load(f)
    if kind is not None and info.get("kind") != kind:
        raise ValueError(f"{directory} holds a {info.get('kind')!r} model, expected {kind!r}")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.abspath(params_path))
    return jax.tree.map(np.asarray, params), info
