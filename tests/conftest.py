"""Test session setup: 8 virtual CPU devices, so sharding is real in every test run; one persistent compilation
cache for the session (fresh per run), shared with the CLI subprocesses the tests start — the same programs are
compiled once per run instead of once per test or process."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:     # set here once; pytest-xdist workers inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="varq-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Each module's compiled programs are dropped after it (memory stays flat over the suite; a program another
    module needs again comes back from the persistent cache)."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
