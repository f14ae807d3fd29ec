"""Resumable state of a reconstruction run: one state directory per finished unit, written atomically.

`workdir/recon-0007` holds the state after 7 finished units (`checkpoint.write_state`): arrays (the quant tree
with the learned α so far, the run's PRNG key data) and meta (finished unit names, their loss records, the run's
fingerprint). Each directory is written under a temporary name and renamed when complete, so the newest
`recon-*` directory is always whole; older ones are removed once a newer one exists.
"""
import os
import re
import shutil
from typing import Optional

from varq_jax.checkpoint import read_state, write_state

FORMAT = "varq-jax/reconstruction"
VERSION = 2
_DIR = re.compile(r"^recon-(\d{4,})$")


def _finished_dirs(workdir: str) -> list:
    if not os.path.isdir(workdir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(workdir) if (m := _DIR.match(name))]
    return [os.path.join(workdir, name) for _, name in sorted(found)]


def save(workdir: str, quant: dict, key_data, done: list, records: list, run_fingerprint: dict) -> str:
    """Writes the state after `len(done)` finished units; removes older states afterwards."""
    path = os.path.join(workdir, f"recon-{len(done):04d}")
    meta = {"format": FORMAT, "version": VERSION, "done": list(done), "records": records,
            "fingerprint": run_fingerprint}
    write_state(path, {"quant": quant, "key": key_data}, meta)
    for old in _finished_dirs(workdir):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_latest(workdir: str) -> Optional[dict]:
    """{'quant', 'key', 'done', 'records', 'fingerprint'} of the newest state in workdir, or None if there is none."""
    dirs = _finished_dirs(workdir)
    if not dirs:
        return None
    arrays, meta = read_state(dirs[-1])
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{dirs[-1]!r} is not a reconstruction state of this version (format "
                         f"{meta.get('format')!r} v{meta.get('version')}); delete it or start over")
    return {"quant": arrays["quant"], "key": arrays["key"], "done": list(meta["done"]),
            "records": list(meta["records"]), "fingerprint": meta["fingerprint"]}
