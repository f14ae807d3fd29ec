"""Orbax checkpoints of a VQVAE + VAR pair: a 'params' item and a JSON 'metadata' item.

A directory appears only when complete: everything is written into a hidden sibling directory that is
renamed at the end, so an interrupted or failed save never leaves a half-written checkpoint behind.
Extra pytree items can be saved beside 'params' (a quantized model's integer codes and scales: `quant/export.py`,
which omits the coded kernels from 'params' and names itself as the loader in the metadata).
"""
import dataclasses
import datetime
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from varq_jax.files import atomic_directory
from varq_jax.fingerprint import is_float, array_digest
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


def storage_dtype(params) -> str:
    """'float32', 'bfloat16', or 'mixed' (e.g. bf16 kernels beside float32 tables)."""
    dtypes = {str(np.asarray(a).dtype) for a in jax.tree.leaves(params)}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _flat(tree, prefix: str = "") -> dict:
    """{'a/b/0': leaf} of nested dicts and lists (lists by index, as Orbax stores them)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix[:-1]: tree} if prefix else {}
    out = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}{k}/"))
    return out


def checksums(items: dict) -> dict:
    """{'item/path/to/leaf': digest} of every array of every item."""
    return {f"{name}/{k}": array_digest(v) for name, tree in items.items() for k, v in _flat(tree).items()}


def non_finite(items: dict) -> list:
    """'item/path' of every floating array holding a NaN or an infinity."""
    bad = []
    for name, tree in items.items():
        for k, v in _flat(tree).items():
            if v is None:
                continue
            a = np.asarray(v)
            if is_float(a) and not np.isfinite(a.astype(np.float32)).all():
                bad.append(f"{name}/{k}")
    return bad


def check_finite(items: dict, what: str) -> None:
    bad = non_finite(items)
    if bad:
        raise CheckpointError(f"{what}: non-finite values (NaN or inf) in {', '.join(bad[:8])}"
                              + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
                              + " (pass allow_nonfinite=True / --allow-nonfinite to accept them)")


def save(path: str, vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, *, meta: Optional[dict] = None,
         items: Optional[dict] = None, overwrite: bool = False, allow_nonfinite: bool = False) -> str:
    """Writes a checkpoint directory atomically; `items` are extra pytrees saved as their own Orbax items. The
    metadata records a checksum of every array (verified on load); non-finite weights are refused unless
    `allow_nonfinite`."""
    params, extra = _to_numpy(params), {k: _to_numpy(v) for k, v in (items or {}).items()}
    if not allow_nonfinite:
        check_finite({"params": params, **extra}, f"refusing to write {path!r}")
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "vae": config_to_dict(vae_cfg),
                "var": config_to_dict(var_cfg), "dtype": storage_dtype(params),
                "items": sorted(items or {}), **(meta or {}),
                "checksums": checksums({"params": params, **extra})}
    metadata.setdefault("provenance", provenance())
    args = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
    for name, tree in extra.items():
        args[name] = ocp.args.StandardSave(tree)
    with atomic_directory(path, overwrite) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, "ckpt"), ocp.args.Composite(**args))
    return path


def read_metadata(path: str) -> dict:
    """The JSON 'metadata' item, read through Orbax (no arrays are touched)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    ckpt = os.path.join(os.path.abspath(path), "ckpt")
    if not os.path.isdir(os.path.join(ckpt, "metadata")):
        raise CheckpointError(f"{path!r} is not a varq-jax checkpoint (no ckpt/metadata item); convert released "
                              f"PyTorch weights with convert_torch_weights.py")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(ckpt, ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    except Exception as e:   # orbax raises many types for unreadable files; name the checkpoint
        raise CheckpointError(f"unreadable metadata in {path!r}: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return meta


def _abstract_like(tree: Any, sharding) -> Any:
    def leaf(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: leaf(x, sharding), tree)
    return jax.tree.map(leaf, tree, sharding)


def load(path: str, *, sharding=None, allow_nonfinite: bool = False) -> ModelCheckpoint:
    """Restores a full-precision checkpoint; `sharding` (one Sharding, or a pytree of them matching params) places
    the parameters straight onto a device mesh. A checkpoint that names another loader in its metadata (a
    quantized one) is refused with that loader's name."""
    meta = read_metadata(path)
    loader = meta.get("loader") or ("varq_jax.quant.load_quantized" if "quant_policy" in meta else None)  # v1
    if loader:
        raise CheckpointError(f"{path!r} is a quantized checkpoint: load it with {loader} "
                              f"(or varq_jax.default_model.load_model)")
    return restore(path, meta, sharding=sharding, allow_nonfinite=allow_nonfinite)


def _without(tree: dict, omitted) -> dict:
    flat = traverse_util.flatten_dict(tree, sep="/")
    unknown = sorted(set(omitted) - set(flat))
    if unknown:
        raise CheckpointError(f"metadata omits parameters that the model does not have: {', '.join(unknown[:5])}")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in set(omitted)}, sep="/")


def restore(path: str, meta: dict, *, omitted=(), sharding=None, allow_nonfinite: bool = False) -> ModelCheckpoint:
    """The arrays of a checkpoint as saved: params (less the `omitted` leaves, 'vae/...'/'var/...' paths, which
    another item holds) and every extra item, each verified against its recorded checksum (checkpoints written
    before checksums were recorded are read unverified) and refused when non-finite unless `allow_nonfinite`.
    bf16 checkpoints stay bf16 (d30/d36 memory); float32 and mixed ones are restored as float32."""
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
    _verify(path, meta, {"params": restored["params"], **items}, allow_nonfinite)
    return ModelCheckpoint(vae_cfg, var_cfg, restored["params"], meta, items)


def _verify(path: str, meta: dict, arrays: dict, allow_nonfinite: bool) -> None:
    """Checksums of every array this process holds whole (a multi-host shard is checked where it is whole)."""
    local = {name: jax.tree.map(lambda a: a if getattr(a, "is_fully_addressable", True) else None, tree)
             for name, tree in arrays.items()}
    recorded = meta.get("checksums")
    if recorded:
        for key, a in ((f"{n}/{k}", v) for n, t in local.items() for k, v in _flat(t).items()):
            if a is not None and key in recorded and array_digest(a) != recorded[key]:
                raise CheckpointError(f"checkpoint {path!r} is corrupt: array {key!r} does not match the checksum "
                                      f"recorded when it was written")
    if not allow_nonfinite:
        check_finite(local, f"checkpoint {path!r}")


# --- run state: the same Orbax layout for a PTQ stage or a reconstruction step ----------------------------------
def write_state(path: str, arrays: dict, meta: dict) -> str:
    """A directory with an Orbax 'arrays' item (omitted when empty) and a JSON 'meta' item that records every
    array's checksum, written atomically (replacing an older one)."""
    arrays = _to_numpy(arrays)
    meta = {**meta, "checksums": checksums({"arrays": arrays}) if arrays else {}}
    args = {"meta": ocp.args.JsonSave(meta)}
    if arrays:
        args["arrays"] = ocp.args.StandardSave(arrays)
    with atomic_directory(path, overwrite=True) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, "ckpt"), ocp.args.Composite(**args))
    return path


def read_state(path: str, arrays: bool = True) -> tuple:
    """(arrays or None, meta) of a `write_state` directory, the arrays verified against their checksums."""
    ckpt = os.path.join(os.path.abspath(path), "ckpt")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(ckpt, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not arrays or not meta.get("checksums"):
                return ({} if arrays else None), meta
            tree = ckptr.restore(ckpt, ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
    except Exception as e:   # orbax raises many types for unreadable files; name the directory
        raise CheckpointError(f"cannot read {path!r}: {type(e).__name__}: {e}") from e
    _verify(path, meta, {"arrays": tree}, allow_nonfinite=True)
    return tree, meta
