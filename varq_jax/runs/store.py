"""The finished stages of a run, each with the fingerprint of what it depended on — so a resumed run reuses what
still fits, refuses what does not (naming the fields that differ), and never relabels stale state.

A stage is a directory `root/<stage>` written atomically with `checkpoint.write_state` (Orbax arrays + a JSON
record: fingerprint, small results, the code and jax versions, array checksums verified on read). A stage with
partial state that survives interruption (reconstruction) also has `root/<stage>.partial/` and a started record.
Runs sharing a root lock a stage (`root/<stage>.lock`) while making it; a second run waits, then reuses it.
`varq_jax.quant.pipeline.NoStore` is the same protocol without disk, for a run without a workdir.
"""
import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Callable, Mapping, Optional

import jax

import varq_jax
from varq_jax.checkpoint import CheckpointError, read_state, write_state
from varq_jax.files import atomic_write
from varq_jax.fingerprint import describe, differences

FORMAT = "varq-jax/stage"
VERSION = 1


class StaleStateError(ValueError):
    """A workdir holds stages made with other settings."""


def versions() -> dict:
    """What made a stage: varq-jax (and its git commit when run from a checkout) and jax."""
    out = {"varq_jax": varq_jax.__version__, "jax": jax.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(varq_jax.__file__)))
        if commit.returncode == 0:
            out["git"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class StageStore:
    """Stages on disk under `root` (a PTQ workdir's `state/`)."""

    def __init__(self, root: str, log: Callable = print, poll_s: float = 1.0):
        self.root, self.log, self.poll_s = os.path.abspath(root), log, poll_s
        os.makedirs(self.root, exist_ok=True)
        self._versions = versions()

    def path(self, stage: str) -> str:
        return os.path.join(self.root, stage)

    def scratch(self, stage: str) -> str:
        return os.path.join(self.root, stage + ".partial")

    def _started_file(self, stage: str) -> str:
        return os.path.join(self.scratch(stage), "started.json")

    # --- records ---------------------------------------------------------------------------------------------
    def record(self, stage: str) -> Optional[dict]:
        """The stage's record if it is finished, else its started record (partial state), else None."""
        if os.path.isdir(self.path(stage)):
            _, meta = read_state(self.path(stage), arrays=False)
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{self.path(stage)!r} is not a stage of a varq-jax run")
            return meta
        started = self._started_file(stage)
        if os.path.exists(started):
            with open(started) as f:
                return json.load(f)
        return None

    def get(self, stage: str, fp: Mapping):
        """(arrays, result) of the finished stage made with fingerprint `fp`; None if it is not finished. A stage
        made with another fingerprint is an error (a run checks `reconcile` first, so this means a concurrent run
        made it with other settings)."""
        if not os.path.isdir(self.path(stage)):
            return None
        arrays, meta = read_state(self.path(stage))
        if differences(meta["fingerprint"], fp):
            raise StaleStateError(f"stage {stage!r} in {self.root} was made with other settings "
                                  f"({describe(meta['fingerprint'], fp)})")
        self._warn_versions(stage, meta)
        return arrays, meta.get("result", {})

    def put(self, stage: str, fp: Mapping, arrays: dict, result: Optional[dict] = None) -> None:
        meta = {"format": FORMAT, "version": VERSION, "stage": stage, "fingerprint": dict(fp),
                "result": result or {}, "versions": self._versions,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_state(self.path(stage), arrays, meta)
        shutil.rmtree(self.scratch(stage), ignore_errors=True)

    def discard(self, stage: str) -> None:
        for p in (self.path(stage), self.scratch(stage)):
            shutil.rmtree(p, ignore_errors=True)

    def _warn_versions(self, stage: str, meta: dict) -> None:
        made = meta.get("versions", {})
        changed = [f"{k} {made.get(k)} → {v}" for k, v in self._versions.items() if made.get(k) not in (None, v)]
        if changed:
            self.log(f"  note: stage {stage!r} was made by other code ({', '.join(changed)}); reusing it")

    def reconcile(self, plan: Mapping[str, Mapping], restart: bool = False) -> list:
        """Before any work: every stage of `plan` ({stage: fingerprint}) that exists must have been made with the
        same fingerprint. Stale stages are an error naming the differing fields, or with `restart` discarded.
        Returns the stale stages (discarded)."""
        stale, fields = [], {}
        for stage, fp in plan.items():
            rec = self.record(stage)
            if rec is not None and differences(rec["fingerprint"], fp):
                stale.append(stage)
                for k in differences(rec["fingerprint"], fp):
                    fields.setdefault(k, (rec["fingerprint"], fp))
        if stale and not restart:
            names = sorted(fields)
            olds = {k: fields[k][0].get(k, "<unset>") for k in names}
            news = {k: fields[k][1].get(k, "<unset>") for k in names}
            raise StaleStateError(f"{os.path.dirname(self.root) or self.root} holds a run made with other settings "
                                  f"({describe(olds, news, names)}); stale stages: {', '.join(stale)}. Start over with "
                                  f"--restart (restart=True) to discard them, or use another workdir")
        for stage in stale:
            self.log(f"  restart: discarding stale stage {stage!r}")
            self.discard(stage)
        return stale

    # --- making a stage ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def making(self, stage: str, fp: Mapping):
        """Holds the stage's lock (waiting while another live run holds it) and records that it was started with
        `fp` (so partial state is checked by `reconcile` as a finished stage is)."""
        lock = os.path.join(self.root, stage + ".lock")
        self._acquire(lock, stage)
        try:
            os.makedirs(self.scratch(stage), exist_ok=True)
            atomic_write(self._started_file(stage), json.dumps({"fingerprint": dict(fp), "started": time.time(),
                                                                "versions": self._versions}))
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)

    def _acquire(self, lock: str, stage: str) -> None:
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        waited = False
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_lock(lock)
                if _is_dead(holder, lock):
                    self.log(f"  taking over the lock of stage {stage!r} left by a stopped run ({holder})")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(lock)
                    continue
                if not waited:
                    self.log(f"  stage {stage!r} is being made by pid {holder.get('pid')} on {holder.get('host')}; "
                             f"waiting for it")
                    waited = True
                time.sleep(self.poll_s)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return


def _read_lock(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _is_dead(holder: Optional[dict], lock: str) -> bool:
    """A lock held by a process of this host that no longer exists (another host's lock is trusted); an
    unreadable lock counts as dead once it is 10 s old (not one being written right now)."""
    if holder is None:
        try:
            return time.time() - os.path.getmtime(lock) > 10
        except OSError:
            return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False
