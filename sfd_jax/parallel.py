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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'); other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """Global batches must be a multiple of this (the number of batch shards)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
