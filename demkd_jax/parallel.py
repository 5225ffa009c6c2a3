"""Data parallelism with ``jax.sharding``: one 1-D ``"data"`` mesh axis from a laptop CPU to a TPU pod.

What is sharded, where the on-device dataset lives, multi-host: docs/parallel.md.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "on", "off")
DATASET_PLACEMENTS = ("replicated", "sharded")


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0").split("(")[0])  # SLURM_TASKS_PER_NODE-like "2(x3)" forms
    except ValueError:
        return 0


def detect_cluster() -> str | None:
    """Describes the multi-process launch this process is part of, or ``None`` for a single process.

    Reads only the environment variables that launchers set and ``jax.distributed.initialize()`` reads (no
    network, no JAX backend). A Cloud TPU VM pod slice publishes its workers only through the metadata server:
    JAX runs it without ``jax.distributed.initialize()``, and ``config.distributed="on"`` starts the
    coordination service there too.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={os.environ['JAX_COORDINATOR_ADDRESS']}"
    slurm = max(_int_env("SLURM_STEP_NUM_TASKS"), _int_env("SLURM_NTASKS"))
    if os.environ.get("SLURM_JOB_ID") and slurm > 1:
        return f"SLURM job {os.environ['SLURM_JOB_ID']} with {slurm} tasks"
    if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI with {os.environ['OMPI_COMM_WORLD_SIZE']} ranks"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in os.environ.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"TPU pod with {len(hosts)} hosts ({name})"
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multislice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    return None


def initialize_distributed(mode: str = "auto") -> bool:
    """Starts JAX's multi-process runtime if ``mode`` asks for it; returns whether it is running.

    ``"on"``: always (JAX finds coordinator, process count and id in the cluster environment); ``"auto"``: when
    :func:`detect_cluster` finds a multi-process launch; ``"off"``: never. Idempotent: a second call (a
    distillation run that first trains its teachers) does nothing.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"unknown config.distributed {mode!r}; expected one of {', '.join(DISTRIBUTED_MODES)}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off" or (mode == "auto" and detect_cluster() is None):
        return False
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # JAX reads the address itself, not the count and id
        for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if os.environ.get(name):
                kwargs[key] = int(os.environ[name])
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "must be called before" in str(e):
            raise RuntimeError(
                "config.distributed asks for jax.distributed.initialize(), but this process already used a JAX "
                "device; start training before any other JAX computation (or set config.distributed='off' "
                "for a single-process run)") from e
        raise
    return True


def mesh_size(config) -> int:
    """The number of devices on the ``data`` axis that ``config.mesh.num_devices`` asks for."""
    n = int(config.mesh.num_devices)
    return jax.device_count() if n == -1 else n


def config_problem(config) -> str | None:
    """Checks ``config.mesh``, ``config.distributed`` and the batch sizes against the devices.

    Returns the first problem as a message naming the value and what was expected, or ``None``.
    """
    if config.distributed not in DISTRIBUTED_MODES:
        return f"unknown config.distributed {config.distributed!r}; expected one of {', '.join(DISTRIBUTED_MODES)}"
    if config.mesh.dataset not in DATASET_PLACEMENTS:
        return (f"unknown config.mesh.dataset {config.mesh.dataset!r}; expected one of "
                f"{', '.join(DATASET_PLACEMENTS)}")
    n_all = jax.device_count()
    n = config.mesh.num_devices
    if not isinstance(n, int) or not (n == -1 or 1 <= n <= n_all):
        return (f"config.mesh.num_devices must be -1 (all {n_all} devices) or between 1 and {n_all}, "
                f"got {n!r}")
    if jax.process_count() > 1 and n not in (-1, n_all):
        return (f"config.mesh.num_devices={n} selects part of the devices, but this run spans "
                f"{jax.process_count()} processes; use -1 (all {n_all} devices)")
    n = mesh_size(config)
    where = f"the {n} devices of the data axis (config.mesh.num_devices={config.mesh.num_devices})"
    if config.batch_size % n:
        return (f"global batch size {config.batch_size} is not divisible by {where}; use a multiple of {n} "
                f"(each device computes batch_size / {n} examples)")
    if config.eval_batch_size % n:
        return f"eval batch size {config.eval_batch_size} is not divisible by {where}; use a multiple of {n}"
    return None


def make_mesh(config_or_n: Any = -1) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``mesh_size(config)`` devices (an int: that many; -1: all)."""
    n = config_or_n if isinstance(config_or_n, int) else mesh_size(config_or_n)
    if n == -1:
        n = jax.device_count()
    devices = jax.devices()[:n]
    axis_types = (jax.sharding.AxisType.Auto,)
    try:
        return jax.make_mesh((n,), (DATA_AXIS,), axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # make_mesh orders devices by the physical topology; a subset of a TPU slice may not form one.
        return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh: model state, teachers, scalars, metrics."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split along ``"data"``, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def dataset_sharding(mesh: Mesh, placement: str) -> NamedSharding:
    """Where the on-device splits live (``config.mesh.dataset``)."""
    if placement not in DATASET_PLACEMENTS:
        raise ValueError(f"unknown dataset placement {placement!r}; expected one of {', '.join(DATASET_PLACEMENTS)}")
    return batch_sharding(mesh) if placement == "sharded" else replicated(mesh)


def constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Inside ``jit``: shards every leaf's leading axis along ``"data"``.

    A no-op without a mesh or on a one-device mesh (nothing to split; the step's outputs then keep the
    placement of its inputs, so a plain ``jax.jit`` of the step does not recompile on its own outputs).
    """
    if mesh is None or mesh.size == 1:
        return tree
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def with_sharding(abstract_tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``sharding`` (restore targets for Orbax)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_tree)


def put_global(array: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global ``jax.Array`` from a host array every process holds, with ``sharding``.

    Each process transfers only the shards of its own (addressable) devices, so this is correct on any
    number of hosts; on one host it is ``jax.device_put``.
    """
    array = np.asarray(array)
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of a host pytree, replicated on the mesh (teachers' variables, restored states)."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda a: put_global(a, sharding), tree)


def put_dataset(images: np.ndarray, labels: np.ndarray, mesh: Mesh, placement: str) -> tuple[jax.Array, jax.Array]:
    """One split on the mesh, replicated or row-sharded (``config.mesh.dataset``).

    ``"sharded"`` pads the rows with zeros to a multiple of the mesh size; the pipeline's indices never
    reach the padding (training indices come from a permutation of the real rows, evaluation indices are
    masked), so the padded arrays give exactly the batches of the unpadded ones.
    """
    sharding = dataset_sharding(mesh, placement)
    if placement == "sharded":
        pad = -images.shape[0] % mesh.size
        images, labels = (np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (images, labels))
    return put_global(images, sharding), put_global(labels, sharding)


def is_primary() -> bool:
    """True in the process that prints, logs and writes files (process 0)."""
    return jax.process_index() == 0


def primary_only(fn: Callable) -> Callable:
    """``fn`` in process 0, a no-op elsewhere (for ``print``-like loggers)."""
    return fn if is_primary() else lambda *args, **kwargs: None


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single process): e.g. after process 0 wrote files others read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def describe(mesh: Mesh, config) -> dict:
    """What the run is sharded over, for the log line and ``summary.json``."""
    return {
        "devices": int(mesh.size),
        "processes": int(jax.process_count()),
        "axis": DATA_AXIS,
        "per_device_batch": int(config.batch_size) // int(mesh.size),
        "dataset": str(config.mesh.dataset),
        "platform": str(mesh.devices.flat[0].platform),
    }
