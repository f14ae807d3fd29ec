"""What a result depends on, as data: digests of arrays and trees, fingerprints of settings, and their differences.

The one helper for every record that must say whether stored state still fits: checkpoint checksums, the sample
plan of an evaluation, the stages of a PTQ workdir and the state of a reconstruction run. A fingerprint is a
flat dict of dotted user-level names ('calib.num_samples', 'model', 'rules') to JSON values, arrays replaced by
their digest, so a mismatch can be told in the names a user set.
"""
import dataclasses
import hashlib
import json
from typing import Any, Mapping

import jax
import numpy as np

_BF16 = np.dtype(jax.numpy.bfloat16)


def is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype == _BF16


def array_digest(a) -> str:
    """SHA-256 of an array's values, dtype-canonical: floats as float32 (bf16 → float32 is exact), so the digest
    is the same whether a leaf is restored in its stored dtype or widened."""
    a = np.asarray(a)
    a = np.ascontiguousarray(a.astype(np.float32) if is_float(a) else a)
    return hashlib.sha256(str(a.shape).encode() + a.dtype.str.encode() + a.tobytes()).hexdigest()


def tree_digest(tree) -> str:
    """SHA-256 over every leaf of a pytree (lists of arrays included), in path order, paths included."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: str(kv[0])):
        h.update(jax.tree_util.keystr(path).encode() + array_digest(leaf).encode())
    return h.hexdigest()


def model_digest(model) -> str:
    """The identity of a loaded model: both configs, its quantization policy and every array's digest (the
    checksums its checkpoint recorded and `checkpoint.load` verified, else computed here)."""
    recorded = (model.meta or {}).get("checksums")
    if recorded:
        arrays = json.dumps(recorded, sort_keys=True)
    else:
        arrays = tree_digest({"params": model.params, "quant": model.quant})
    h = hashlib.sha256(json.dumps([dataclasses.asdict(model.vae_cfg), dataclasses.asdict(model.var_cfg)],
                                  sort_keys=True, default=str).encode())
    h.update(repr(getattr(model.policy, "to_dict", lambda: model.policy)()).encode())
    h.update(arrays.encode())
    return h.hexdigest()


def _has_arrays(value) -> bool:
    return any(isinstance(leaf, (np.ndarray, np.generic, jax.Array)) for leaf in jax.tree.leaves(value))


def _plain(value):
    if _has_arrays(value):
        return tree_digest(value)
    return json.loads(json.dumps(value, default=str))


def fingerprint(parts: Mapping[str, Any] = (), **named) -> dict:
    """A flat JSON-able record of what determines a result: nested dicts flattened to dotted names, dataclasses
    as their fields, arrays (and trees holding them) as digests."""
    out = {}

    def put(name, value):
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
        if isinstance(value, Mapping) and value and not _has_arrays(value):
            for k, v in value.items():
                put(f"{name}.{k}", v)
        else:
            out[name] = _plain(value)
    for name, value in {**dict(parts), **named}.items():
        put(name, value)
    return out


def record_digest(record: Mapping) -> str:
    """A short stable name of a fingerprint (16 hex digits), for reports and tables."""
    return hashlib.sha256(json.dumps(dict(record), sort_keys=True).encode()).hexdigest()[:16]


def differences(old: Mapping, new: Mapping) -> list:
    """Names whose values differ (present in one only included), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))


def describe(old: Mapping, new: Mapping, names=None, limit: int = 8) -> str:
    """'calib.num_samples: 4 there, 8 now; model: another checkpoint' for the differing names."""
    names = differences(old, new) if names is None else list(names)

    def show(v):
        if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
            return v[:12]
        text = json.dumps(v) if not isinstance(v, str) else repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    parts = [f"{k}: {show(old.get(k, '<unset>'))} there, {show(new.get(k, '<unset>'))} now" for k in names[:limit]]
    return "; ".join(parts) + (f"; and {len(names) - limit} more" if len(names) > limit else "")
