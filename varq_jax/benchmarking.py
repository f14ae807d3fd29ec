"""Timing helpers for benchmarks (compile time separate from steady-state time)."""
import time

import jax
import numpy as np


def compile_timed(jitted, *args, **kwargs):
    """(the executable of `jitted` for these arguments, seconds to lower and compile it); nothing is executed.
    Time the executable itself: calling `jitted` afterwards would compile a second time."""
    t = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t


def median_time(fn, *args, repeats: int = 5, warmup: int = 1, **kwargs) -> float:
    """Median wall time of fn(*args) with the result blocked on, after warm-up calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform}) x{jax.device_count()}"
