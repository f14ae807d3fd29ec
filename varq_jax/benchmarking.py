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


SCOPES = ("linear", "act_quant", "weight_quant", "attention")     # the named scopes of the models (var.py, quant/)


def _instruction_scopes(hlo_text: str) -> dict:
    """{HLO instruction name: first of SCOPES in its op_name metadata, or 'rest'} of an optimised module."""
    import re
    out = {}
    for m in re.finditer(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"', hlo_text, re.M):
        out[m.group(1)] = next((s for s in SCOPES if f"/{s}/" in m.group(2) + "/"), "rest")
    return out


def time_breakdown(compiled, *args) -> dict:
    """Seconds of device kernels per part ({scope: s, 'rest': s, 'unmapped': s}) of one call of a compiled program,
    from a profiler trace: each kernel is charged to the named scope of the HLO instruction it runs."""
    import glob
    import tempfile
    scopes = _instruction_scopes(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0])
    parts, unmapped, seen = {}, {}, []
    for plane in data.planes:
        seen += [f"{plane.name} | {line.name} ({sum(1 for _ in line.events)} events)" for line in plane.lines]
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower() or "memcpy" in line.name.lower():
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                op = str(stats.get("hlo_op", ev.name))
                part = scopes.get(op, "unmapped")
                parts[part] = parts.get(part, 0.0) + ev.duration_ns * 1e-9
                if part == "unmapped":
                    unmapped[op] = unmapped.get(op, 0.0) + ev.duration_ns * 1e-9
    parts["top_unmapped"] = sorted(unmapped.items(), key=lambda kv: -kv[1])[:5]
    if len(parts) == 1:         # no kernel seen (session 16 on an H200: an empty breakdown): what the trace held
        parts["no_kernels_in_trace"] = {"files": len(files), "lines": seen[:40]}
    return parts
