"""Progress of long work: a live line on a terminal, otherwise one plain line at most every `interval` seconds
(cluster logs are piped), always the last one."""
import sys
import time
from typing import Callable, Optional


class Progress:
    """`update(text, final=False)`: show `text` as the current state. On a terminal the line is rewritten in
    place; elsewhere it is printed when `interval` seconds have passed since the last printed line, or when final."""

    def __init__(self, stream=None, interval: float = 30.0, live: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval, self.clock = interval, clock
        self.last: Optional[float] = None
        self.width = 0

    def update(self, text: str, final: bool = False) -> bool:
        """True when the text was written."""
        now = self.clock()
        if self.live:
            self.stream.write("\r" + text.ljust(self.width) + ("\n" if final else ""))
            self.width = 0 if final else len(text)
        elif final or self.last is None or now - self.last >= self.interval:
            self.stream.write(text + "\n")
        else:
            return False
        self.stream.flush()
        self.last = now
        return True


def seconds_left(done: int, total: int, elapsed: float) -> Optional[float]:
    """Seconds left at the rate so far (None before the first step and after the last)."""
    if done <= 0 or done >= total:
        return None
    return elapsed / done * (total - done)


def duration(seconds: float) -> str:
    return f"{int(seconds // 60)} m {int(seconds % 60):02d} s" if seconds >= 60 else f"{seconds:.0f} s"


def eta(done: int, total: int, elapsed: float) -> str:
    """'ETA 1 m 05 s' from the rate so far ('' before the first step)."""
    left = seconds_left(done, total, elapsed)
    return "" if left is None else f"ETA {duration(left)}"
