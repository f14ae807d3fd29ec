"""Atomic outputs: a reader (or a resumed run) sees a whole file or directory, or none — never a part of one."""
import contextlib
import os
import shutil
import uuid
from typing import Callable, Union


def _sibling(path: str, what: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{what}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str, content: Union[bytes, str, Callable]) -> None:
    """Writes bytes, text, or `content(binary file)` into a temporary sibling, fsyncs, then renames onto `path`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yields a temporary directory beside `path`; renames it to `path` only if the block succeeds."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} already exists (refusing to overwrite)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling(path, "partial")
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
