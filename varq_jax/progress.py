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


def eta(done: int, total: int, elapsed: float) -> str:
    """'ETA 1 m 05 s' from the rate so far ('' before the first step)."""
    if done <= 0 or done >= total:
        return ""
    left = elapsed / done * (total - done)
    return f"ETA {int(left // 60)} m {int(left % 60):02d} s" if left >= 60 else f"ETA {left:.0f} s"
