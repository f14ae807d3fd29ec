"""Test session setup: 8 virtual CPU devices, so sharding is real in every test run; one persistent compilation
cache for the session (fresh per run), shared with the CLI subprocesses the tests start — the same programs are
compiled once per run instead of once per test or process."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from varq_jax import cli  # noqa: E402  (imports no JAX)

cli.configure_xla()       # XLA_FLAGS as the CLIs set them: the cache key of a program is the same in-process and in a
                          # CLI subprocess, so either one compiles it for both
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


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
    """A directory every pytest-xdist worker of this run sees: their common temp root (the run's own without xdist)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def _tiny_flat(shared_tmp):
    """Flax's initial parameters of `zoo.tiny((1, 2, 3, 4))` with PRNGKey(0), flat: computed by the first worker that
    asks (the init runs eagerly, ~20 s on a 2-core CPU), saved, and loaded by the others under a file lock."""
    import fcntl

    import jax
    import numpy as np
    from flax import traverse_util

    from varq_jax.models import zoo
    from varq_jax.models.build import init_params
    path = shared_tmp / "tiny_params.npz"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            params = init_params(*zoo.tiny((1, 2, 3, 4)), jax.random.PRNGKey(0))
            flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
            np.savez(f"{path}.partial.npz", **flat)
            os.replace(f"{path}.partial.npz", path)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tiny_params(_tiny_flat):
    """`init_params(*zoo.tiny((1, 2, 3, 4)), PRNGKey(0))`, the same values for every module that samples the tiny
    model; a fresh tree per module (a module may change it)."""
    import jax.numpy as jnp
    from flax import traverse_util
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in _tiny_flat.items()}, sep="/")


# The slowest files first (their time alone on a 2-core CPU, longest first), the rest in collection order after
# them: with the files handed to the two xdist workers in this order, the last ones are short and both workers
# finish at about the same time (xdist's default, files with the most tests first, left heavy files of few tests
# for the end).
SLOWEST_FIRST = ("test_integer.py", "test_extension.py", "test_ablation.py", "test_quantize_cli.py", "test_rules.py",
                 "test_runs.py", "test_sampling.py", "test_quant_policy.py", "test_preset_digests.py",
                 "test_reconstruction.py", "test_train.py", "test_evaluate.py", "test_fused_qkv.py", "test_var_parity.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False          # keep the order below (pytest-xdist's --no-loadscope-reorder)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: the rest keep their order
