"""Stopping a long invocation without losing what it finished.

A device lease ends with `timeout`'s SIGTERM, and a killed ablation loses every row it had finished (session 20 lost
two). Inside `raising(signals)` the first of `signals` raises `Stopped` where the main thread is, so that the caller
can write what it finished; inside `ignoring(signals)` they are ignored, so that the writing itself is not cut
(`timeout -k GRACE` still kills a process that overruns its grace). Work interrupted by `Stopped` is left as a
killed process would leave it: every stage writes atomically and resumes. Signal handlers are process-wide and
can only be set from the main thread, so only the CLI layer asks for them.
"""
import contextlib
import signal
from typing import Sequence


class Stopped(Exception):
    """A stop signal arrived (its name is the message)."""


@contextlib.contextmanager
def _handling(signals: Sequence[int], handler):
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignoring(signals: Sequence[int]):
    """Within: `signals` are ignored (no-op for none)."""
    return _handling(signals, signal.SIG_IGN)


def raising(signals: Sequence[int]):
    """Within: the first of `signals` raises Stopped; later ones are ignored until the context ends (no-op for
    none)."""
    def handler(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)
    return _handling(signals, handler)
