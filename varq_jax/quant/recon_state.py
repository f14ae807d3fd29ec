"""Resumable state of a reconstruction run: one Orbax directory per finished unit, written atomically.

`workdir/recon-0007` holds the state after 7 finished units: item 'state' (the quant tree with the learned α so
far, the run's PRNG key data) and a JSON item 'meta' (finished unit names, their loss records, the run's
fingerprint). Each directory is written under a temporary name and renamed when complete, so the newest
`recon-*` directory is always whole; older ones are removed once a newer one exists.
"""
import hashlib
import json
import os
import re
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from varq_jax.checkpoint import atomic_directory

FORMAT = "varq-jax/reconstruction"
VERSION = 1
_DIR = re.compile(r"^recon-(\d{4,})$")


def fingerprint(**parts) -> dict:
    """A JSON-able summary of what determines a run: plain values kept, arrays replaced by a SHA-256 digest."""
    def digest(tree) -> str:
        h = hashlib.sha256()
        for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: str(kv[0])):
            a = np.asarray(leaf)
            h.update(str(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    out = {}
    for name, value in parts.items():
        is_json = isinstance(value, (str, int, float, bool, type(None), list, dict))
        out[name] = json.loads(json.dumps(value)) if is_json and not _has_arrays(value) else digest(value)
    return out


def _has_arrays(value) -> bool:
    return any(isinstance(leaf, (np.ndarray, jax.Array)) for leaf in jax.tree.leaves(value))


def _finished_dirs(workdir: str) -> list:
    if not os.path.isdir(workdir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(workdir) if (m := _DIR.match(name))]
    return [os.path.join(workdir, name) for _, name in sorted(found)]


def save(workdir: str, quant: dict, key_data, done: list, records: list, run_fingerprint: dict) -> str:
    """Writes the state after `len(done)` finished units; removes older states afterwards."""
    path = os.path.join(workdir, f"recon-{len(done):04d}")
    tree = {"quant": jax.tree.map(np.asarray, quant), "key": np.asarray(key_data)}
    meta = {"format": FORMAT, "version": VERSION, "done": list(done), "records": records,
            "fingerprint": run_fingerprint}
    with atomic_directory(path, overwrite=True) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, "ckpt"),
                       ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    for old in _finished_dirs(workdir):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_latest(workdir: str) -> Optional[dict]:
    """{'quant', 'key', 'done', 'records', 'fingerprint'} of the newest state in workdir, or None if there is none."""
    dirs = _finished_dirs(workdir)
    if not dirs:
        return None
    path = dirs[-1]
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            r = ckptr.restore(os.path.join(os.path.abspath(path), "ckpt"),
                              ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:   # orbax raises many types for unreadable files; name the directory
        raise ValueError(f"cannot read reconstruction state {path!r}: {type(e).__name__}: {e}") from e
    meta = r["meta"]
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a reconstruction state (format {meta.get('format')!r})")
    return {"quant": r["state"]["quant"], "key": r["state"]["key"], "done": list(meta["done"]),
            "records": list(meta["records"]), "fingerprint": meta["fingerprint"]}
