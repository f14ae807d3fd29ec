"""Scale-out helpers: device mesh, multi-host start-up, sharding of batches and parameters.

One 2-D mesh ('data', 'model') serves every job: batches are split along 'data'; the optional 'model' axis splits
the VAR's Linear kernels Megatron-style (column-parallel: qkv, fc1, AdaLN, heads; row-parallel: proj, fc2) so
d30/d36 parameters need not be replicated. Everything runs through `jax.jit` with `NamedSharding`s; XLA's
partitioner inserts the collectives.

Multi-host: every process runs the same program on the same global arrays. Host data enters through
`put_global` (each process holds the whole host array and hands its devices only their rows) and leaves
through `local_rows` (the rows this process's devices hold, one copy each) or `gather` (the whole array on
every process).
"""
import functools
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
MULTIHOST_MODES = ("auto", "on", "off")
# Linear sites whose kernel [in, out] is split along its input features; every other 2-D VAR kernel is split along
# its output features. A column-parallel layer followed by a row-parallel one needs one reduction between them.
ROW_PARALLEL_SITES = ("proj", "fc2")


# --- multi-host start-up ---------------------------------------------------------------------------------------
def multiprocess_launch_detected() -> Optional[str]:
    """The environment variable that says this process is one of several (None for a single-process run)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for var, present in (("SLURM_NTASKS", "SLURM_PROCID"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")):
        try:
            if present in os.environ and int(os.environ.get(var, "1")) > 1:
                return var
        except ValueError:
            pass
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU_WORKER_HOSTNAMES"
    return None


def initialize_distributed(mode: str = "auto", coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
    """Calls `jax.distributed.initialize` when the job is multi-process; must run before any other JAX call.

    mode 'auto' initialises when a coordinator address is given or the environment shows a multi-process launch
    (SLURM, Open MPI, a TPU pod, JAX_COORDINATOR_ADDRESS); 'on' always (JAX detects the cluster or uses the
    arguments); 'off' never. Returns whether this process is part of a distributed job.
    """
    if mode not in MULTIHOST_MODES:
        raise ValueError(f"multihost mode must be one of {MULTIHOST_MODES}, got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off" or (mode == "auto" and coordinator_address is None and multiprocess_launch_detected() is None):
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_across_processes(flags: np.ndarray) -> np.ndarray:
    """Element-wise OR of a bool vector over all processes (identical on every process afterwards)."""
    flags = np.asarray(flags, bool)
    if jax.process_count() == 1:
        return flags
    gathered = multihost_utils.process_allgather(flags.astype(np.int32))
    return np.asarray(gathered).reshape(jax.process_count(), -1).any(axis=0)


# --- mesh ----------------------------------------------------------------------------------------------------
def make_mesh(model_parallel: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must be a positive divisor of the device count "
                         f"{len(devices)}")
    shape = (len(devices) // model_parallel, model_parallel)
    return jax.make_mesh(shape, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', everything else replicated (also over 'model')."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _names(path) -> Tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def var_kernel_spec(names: Tuple[str, ...], shape: Tuple[int, ...], model_size: int) -> P:
    """PartitionSpec of one VAR parameter: 2-D kernels split over 'model' where the split dimension divides."""
    if model_size == 1 or names[-1] != "kernel" or len(shape) != 2:
        return P()
    dim = 0 if len(names) >= 2 and names[-2] in ROW_PARALLEL_SITES else 1
    if shape[dim] % model_size:
        return P()
    return P(MODEL, None) if dim == 0 else P(None, MODEL)


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """NamedShardings for {'vae': ..., 'var': ...}: the VQVAE replicated, VAR kernels per `var_kernel_spec`."""
    model_size = mesh.shape[MODEL]

    def sharding(path, leaf):
        names = _names(path)
        spec = var_kernel_spec(names, np.shape(leaf), model_size) if names[0] == "var" else P()
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(sharding, params)


# --- host ↔ device ---------------------------------------------------------------------------------------------
def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full; each device receives only its slice."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_tree(tree, shardings) -> Any:
    """`put_global` over a pytree (shardings: one Sharding or a matching pytree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put_global(x, shardings), tree)
    return jax.tree.map(put_global, tree, shardings)


def local_rows(x: jax.Array) -> List[Tuple[int, np.ndarray]]:
    """(first row, rows) of each block of the leading axis held by this process's devices, one copy each, in order."""
    blocks = {}
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = (shard.index[0].start or 0) if shard.index else 0
        blocks[start] = np.asarray(shard.data)
    return sorted(blocks.items(), key=lambda kv: kv[0])


def gather(x) -> np.ndarray:
    """The whole global array as NumPy on every process."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- batched application -----------------------------------------------------------------------------------------
def global_batch_size(mesh: Mesh, per_device_batch: int) -> int:
    if per_device_batch < 1:
        raise ValueError(f"per_device_batch must be positive, got {per_device_batch}")
    return per_device_batch * data_size(mesh)


@functools.lru_cache(maxsize=64)
def _jit_batched(fn: Callable, mesh: Mesh) -> Callable:
    return jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=batch_sharding(mesh))


def rebatch(chunks: Iterator, batch: int) -> Iterator[Tuple[Any, int]]:
    """Regroups a stream of pytrees with a leading axis into batches of exactly `batch` rows; the last one is
    padded by repeating its last row. Yields (batch, number of real rows)."""
    pending, count = [], 0
    for chunk in chunks:
        n = jax.tree.leaves(chunk)[0].shape[0]
        pending.append(chunk)
        count += n
        while count >= batch:
            joined = jax.tree.map(lambda *xs: np.concatenate(xs), *pending)
            yield jax.tree.map(lambda x: x[:batch], joined), batch
            rest = jax.tree.map(lambda x: x[batch:], joined)
            count -= batch
            pending = [rest] if count else []
    if count:
        joined = jax.tree.map(lambda *xs: np.concatenate(xs), *pending)
        pad = batch - count
        yield jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]), joined), count


def map_batched(fn: Callable, variables: Any, chunks, mesh: Mesh, per_device_batch: int) -> Any:
    """Applies jittable `fn(variables, batch) → pytree of [B, ...]` to a stream of host batches (NumPy pytrees,
    any sizes, or one array), data-parallel over `mesh` in fixed global batches (the last padded); returns the
    outputs concatenated as NumPy, on every process. `fn` should be a stable (module-level) function: it keys the
    compilation cache."""
    if isinstance(chunks, np.ndarray) or isinstance(chunks, jax.Array):
        chunks = [np.asarray(chunks)]
    batch = global_batch_size(mesh, per_device_batch)
    compiled = _jit_batched(fn, mesh)
    variables = put_tree(variables, replicated(mesh))
    outs = []
    for host_batch, real in rebatch(iter(chunks), batch):
        out = compiled(variables, put_tree(host_batch, batch_sharding(mesh)))
        outs.append(jax.tree.map(lambda y: gather(y)[:real], out))
    if not outs:
        raise ValueError("no input rows to process")
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)
