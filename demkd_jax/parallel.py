"""Data parallelism with ``jax.sharding``: one code path from a laptop CPU to a TPU pod.

The trainer runs the same ``jax.jit`` step everywhere; only the shardings of its inputs and outputs change.

- **Mesh.** :func:`make_mesh` builds a 1-D :class:`jax.sharding.Mesh` with one axis, ``"data"``, over all
  devices of all processes (``config.mesh.num_devices = -1``) or over the first ``n`` devices of a single
  process (``n = 1`` turns data parallelism off). The axis is an ``Auto`` axis: the compiler propagates
  the batch sharding through the unchanged model and loss code; we only pin the inputs, the batch and
  the outputs.
- **What is sharded.** The per-step batch is split along ``"data"`` (each device computes 1/n of it:
  :func:`constrain_batch` right after the on-device gather). Student, connector and optimizer state and
  the teachers' variables are replicated (:func:`replicated`). Every reduction over the batch axis --
  BatchNorm's mean and variance, the loss means, the metric means, the gradients -- is a reduction over a
  sharded axis, which XLA lowers to a cross-device all-reduce: BatchNorm statistics are those of the
  *global* batch and a run does not depend on the device count (``tests/test_sharding.py`` checks
  1 vs 8 devices, and that per-device statistics would have failed that check).
- **The on-device dataset** (``config.mesh.dataset``):

  - ``"replicated"`` (default): every device holds the whole split (CIFAR-100: 146 MiB train + 29 MiB
    test as uint8, small next to any accelerator's memory). A step gathers its batch with indices that are
    sharded along ``"data"``, so each device gathers only its own rows from its own copy: no
    communication at all for the input pipeline.
  - ``"sharded"``: every device holds 1/n of the split (rows zero-padded to a multiple of n; the padding
    is never indexed). Batches are drawn from the whole split (a global shuffle, so the run is the same
    as with a replicated dataset), so a device does not hold most of the rows it needs; XLA partitions
    the gather as an all-gather of the B indices, a masked local gather on every device and an
    all-reduce of the uint8 batch (B x 3 KiB per step). Use it when a split does not fit one device.

  Either way each process builds the global arrays from the shards its own devices hold
  (:func:`put_global`, ``jax.make_array_from_callback``): on a pod no host ever places another host's rows.
- **Multi-host.** :func:`initialize_distributed` calls :func:`jax.distributed.initialize` when
  ``config.distributed`` is ``"on"``, or ``"auto"`` and the environment is a multi-process launch
  (:func:`detect_cluster`: ``JAX_COORDINATOR_ADDRESS``, SLURM or Open MPI with more than one task, a GKE
  TPU pod's worker list, a multislice TPU). It must run before anything touches a JAX device, so the
  trainer calls it first. Every process runs the same program on the same global arrays; only process 0
  (:func:`is_primary`) prints, logs and writes files; every process calls Orbax (its CheckpointManager
  coordinates the processes and writes each replicated array once).

Nothing here is specific to CPU, GPU or TPU; the tests run it with 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from demkd_jax.config import default_mesh_config

DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "on", "off")
DATASET_PLACEMENTS = ("replicated", "sharded")

__all__ = [
    "DATA_AXIS",
    "DATASET_PLACEMENTS",
    "DISTRIBUTED_MODES",
    "default_mesh_config",
    "detect_cluster",
    "initialize_distributed",
    "config_problem",
    "mesh_size",
    "make_mesh",
    "replicated",
    "batch_sharding",
    "dataset_sharding",
    "constrain_batch",
    "put_global",
    "put_replicated",
    "put_dataset",
    "with_sharding",
    "is_primary",
    "primary_only",
    "sync",
    "describe",
]


# ----------------------------------------------------------------------------------------------------------
# Configuration


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0").split("(")[0])  # SLURM_TASKS_PER_NODE-like "2(x3)" forms
    except ValueError:
        return 0


def detect_cluster() -> str | None:
    """Describes the multi-process launch this process is part of, or ``None`` for a single process.

    Looks only at the environment (no network, no JAX backend), at the variables the launchers set and that
    :func:`jax.distributed.initialize` reads when called without arguments:

    - ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``): an explicit launch.
    - SLURM with more than one task (``SLURM_NTASKS`` or ``SLURM_STEP_NUM_TASKS``).
    - Open MPI with more than one rank (``OMPI_COMM_WORLD_SIZE``).
    - A TPU pod on GKE (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` listing several hosts) or a
      multislice TPU (``MEGASCALE_COORDINATOR_ADDRESS``).

    A Cloud TPU VM pod slice created with ``gcloud compute tpus tpu-vm create`` publishes its workers only
    through the metadata server, not the environment; JAX runs such pods without
    ``jax.distributed.initialize()`` (the TPU runtime connects the hosts), and ``config.distributed="on"``
    starts the coordination service there too (JAX finds the coordinator in the TPU metadata).
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

    ``"off"``: never. ``"on"``: always (``jax.distributed.initialize()`` finds the coordinator, process count
    and id from the cluster environment: SLURM, Open MPI, Cloud TPU, Kubernetes, or ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). ``"auto"``: when :func:`detect_cluster` finds a multi-process
    launch. Idempotent: a second call (a distillation run that first trains its teachers) does nothing.
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


def _in_multiprocess() -> bool:
    return jax.process_count() > 1


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
    if _in_multiprocess() and n not in (-1, n_all):
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


# ----------------------------------------------------------------------------------------------------------
# Mesh and shardings


def make_mesh(config_or_n: Any = -1) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``mesh_size(config)`` devices (an int: that many; -1: all)."""
    n = config_or_n if isinstance(config_or_n, int) else mesh_size(config_or_n)
    if n == -1:
        n = jax.device_count()
    devices = jax.devices() if n == jax.device_count() else jax.devices()[:n]
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


# ----------------------------------------------------------------------------------------------------------
# Host -> device


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
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)])
    return put_global(images, sharding), put_global(labels, sharding)


# ----------------------------------------------------------------------------------------------------------
# Processes


def is_primary() -> bool:
    """True in the process that prints, logs and writes files (process 0)."""
    return jax.process_index() == 0


def primary_only(fn: Callable) -> Callable:
    """``fn`` in process 0, a no-op elsewhere (for ``print``-like loggers)."""
    if is_primary():
        return fn
    return lambda *args, **kwargs: None


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single process): e.g. after process 0 wrote files others read."""
    if _in_multiprocess():
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
