"""Orbax checkpoints of a VQVAE + VAR pair: a 'params' item and a JSON 'metadata' item.

A directory appears only when complete: everything is written into a hidden sibling directory that is
renamed at the end, so an interrupted or failed save never leaves a half-written checkpoint behind.
Extra pytree items can be saved beside 'params' (a quantized model's integer codes and scales: `quant/export.py`,
which omits the coded kernels from 'params' and names itself as the loader in the metadata).
"""
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import uuid
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from varq_jax.models.build import abstract_params
from varq_jax.models.var import VARConfig
from varq_jax.models.vqvae import VQVAEConfig
from varq_jax.models.zoo import config_from_dict, config_to_dict

FORMAT = "varq-jax/models"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ModelCheckpoint:
    """What a checkpoint holds: both configs, the params {'vae', 'var'}, metadata, and any extra items."""
    vae_cfg: VQVAEConfig
    var_cfg: VARConfig
    params: dict
    meta: dict
    items: dict = dataclasses.field(default_factory=dict)

    policy: Any = None        # set by varq_jax.quant.load_quantized for a quantized checkpoint
    quant: Any = None         # its 'quant' collection (weight scales, θ)


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or not one of ours."""


def provenance(**extra) -> dict:
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, **extra}


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yields a temporary directory beside `path`; renames it to `path` only if the block succeeds."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} already exists (refusing to overwrite)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def storage_dtype(params) -> str:
    """'float32', 'bfloat16', or 'mixed' (e.g. bf16 kernels beside float32 tables)."""
    dtypes = {str(np.asarray(a).dtype) for a in jax.tree.leaves(params)}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def save(path: str, vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, *, meta: Optional[dict] = None,
         items: Optional[dict] = None, overwrite: bool = False) -> str:
    """Writes a checkpoint directory atomically; `items` are extra pytrees saved as their own Orbax items."""
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "vae": config_to_dict(vae_cfg),
                "var": config_to_dict(var_cfg), "dtype": storage_dtype(params),
                "items": sorted(items or {}), **(meta or {})}
    metadata.setdefault("provenance", provenance())
    args = {"params": ocp.args.StandardSave(_to_numpy(params)), "metadata": ocp.args.JsonSave(metadata)}
    for name, tree in (items or {}).items():
        args[name] = ocp.args.StandardSave(_to_numpy(tree))
    with atomic_directory(path, overwrite) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, "ckpt"), ocp.args.Composite(**args))
    return path


def read_metadata(path: str) -> dict:
    meta_file = os.path.join(path, "ckpt", "metadata", "metadata")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(meta_file):
        raise CheckpointError(f"{path!r} is not a varq-jax checkpoint (no ckpt/metadata item); convert released "
                              f"PyTorch weights with convert_torch_weights.py")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable metadata in {path!r}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _abstract_like(tree: Any, sharding) -> Any:
    def leaf(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: leaf(x, sharding), tree)
    return jax.tree.map(leaf, tree, sharding)


def load(path: str, *, sharding=None) -> ModelCheckpoint:
    """Restores a full-precision checkpoint; `sharding` (one Sharding, or a pytree of them matching params) places
    the parameters straight onto a device mesh. A checkpoint that names another loader in its metadata (a
    quantized one) is refused with that loader's name."""
    meta = read_metadata(path)
    loader = meta.get("loader") or ("varq_jax.quant.load_quantized" if "quant_policy" in meta else None)  # v1
    if loader:
        raise CheckpointError(f"{path!r} is a quantized checkpoint: load it with {loader} "
                              f"(or varq_jax.default_model.load_model)")
    return restore(path, meta, sharding=sharding)


def _without(tree: dict, omitted) -> dict:
    flat = traverse_util.flatten_dict(tree, sep="/")
    unknown = sorted(set(omitted) - set(flat))
    if unknown:
        raise CheckpointError(f"metadata omits parameters that the model does not have: {', '.join(unknown[:5])}")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in set(omitted)}, sep="/")


def restore(path: str, meta: dict, *, omitted=(), sharding=None) -> ModelCheckpoint:
    """The arrays of a checkpoint as saved: params (less the `omitted` leaves, 'vae/...'/'var/...' paths, which
    another item holds) and every extra item. bf16 checkpoints stay bf16 (d30/d36 memory); float32 and mixed ones
    are restored as float32."""
    vae_cfg = config_from_dict(VQVAEConfig, meta["vae"])
    var_cfg = config_from_dict(VARConfig, meta["var"])
    dtype = np.dtype("bfloat16") if meta.get("dtype") == "bfloat16" else np.dtype("float32")
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract_params(vae_cfg, var_cfg))
    if omitted:
        shapes = _without(shapes, omitted)
    args = {"params": ocp.args.StandardRestore(_abstract_like(shapes, sharding)), "metadata": ocp.args.JsonRestore()}
    for name in meta.get("items", []):
        args[name] = ocp.args.StandardRestore()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(os.path.join(os.path.abspath(path), "ckpt"), ocp.args.Composite(**args))
    except Exception as e:   # orbax raises many types for truncated/corrupt files; name the checkpoint
        raise CheckpointError(f"cannot restore checkpoint {path!r}: {type(e).__name__}: {e}") from e
    items = {k: restored[k] for k in meta.get("items", [])}
    return ModelCheckpoint(vae_cfg, var_cfg, restored["params"], meta, items)
