"""Device mesh and shardings: one ``Mesh`` with axes ('data', 'fsdp'); batches shard over both axes."""
from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh over ``devices`` (default: all). ``-1`` on one axis takes the remaining devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data, mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} != {n} devices")
    return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


def mesh_from_config(config) -> Mesh:
    mesh = config.get("mesh", None)
    return make_mesh(mesh.data, mesh.fsdp) if mesh is not None else make_mesh()


def fsdp_min_size(config) -> int:
    """Arrays with fewer elements than this stay replicated (config ``mesh.fsdp_min_size``)."""
    mesh = config.get("mesh", None)
    return int(mesh.get("fsdp_min_size", 2 ** 14)) if mesh is not None else 2 ** 14


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'); other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """Global batches must be a multiple of this (the number of batch shards)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 14) -> P:
    """Shard the largest dimension divisible by the fsdp axis size; replicate small or indivisible arrays."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(tree, mesh: Mesh, min_size: int = 2 ** 14):
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs: parameters and optimizer moments shard over
    'fsdp' by :func:`fsdp_spec` (replicated over 'data'); scalars and small arrays replicate."""
    k = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), k, min_size)), tree)


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the environment asks for it: ``JAX_COORDINATOR_ADDRESS`` (with
    ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``) is set, or ``SFD_DISTRIBUTED=1`` (a TPU VM slice or a SLURM job,
    whose topology JAX detects itself); ``SFD_DISTRIBUTED=0`` disables it. Call before any other JAX use."""
    import os
    want = os.environ.get("SFD_DISTRIBUTED", "auto")
    has_coord = bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"))
    if want == "0" or (want == "auto" and not has_coord):
        return
    if jax.distributed.is_initialized():
        return
    coord = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
    nproc = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    if coord and nproc is not None and pid is not None:
        jax.distributed.initialize(coord, int(nproc), int(pid))
    else:
        jax.distributed.initialize()
