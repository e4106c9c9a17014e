"""Device meshes from `--mesh tp=N[,dp=M]`.

tp: tensor parallelism inside one engine (weights, KV heads and FFN split over tp devices).
dp: independent engine replicas (as vLLM's data-parallel serving), each over its own tp devices;
the server builds one Engine per replica mesh and routes each request to the least loaded.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

TP = "tp"  # the one axis name of every replica mesh
MESH_AXES = ("tp", "dp")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    tp: int = 1
    dp: int = 1

    @property
    def num_devices(self) -> int:
        return self.tp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp},dp={self.dp}"


def _parse_size(axis: str, value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"--mesh: {axis} must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"--mesh: {axis} must be a positive integer, got {size}")
    return size


def parse_mesh(text: str | None) -> MeshSpec:
    """"tp=2", "tp=2,dp=2", "dp=2,tp=4"; "" or None -> one device. Raises ValueError naming the problem."""
    if text is None or not text.strip():
        return MeshSpec()
    sizes: dict[str, int] = {}
    for item in text.split(","):
        axis, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not axis or not value:
            raise ValueError(f"--mesh: expected axis=size, got {item.strip()!r} (e.g. tp=2,dp=2)")
        if axis not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {axis!r} (known: {', '.join(MESH_AXES)})")
        if axis in sizes:
            raise ValueError(f"--mesh: axis {axis!r} given twice")
        sizes[axis] = _parse_size(axis, value)
    return MeshSpec(**sizes)


def replica_meshes(spec: MeshSpec, devices=None) -> list[Mesh]:
    """dp meshes with one axis "tp", replica i over devices [i*tp, (i+1)*tp) (consecutive devices
    are the closest ones on GPU hosts and TPU slices)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < spec.num_devices:
        raise ValueError(f"--mesh {spec}: needs {spec.num_devices} devices (tp x dp), "
                         f"but only {len(devices)} are available")
    return [Mesh(np.asarray(devices[i * spec.tp:(i + 1) * spec.tp]), (TP,)) for i in range(spec.dp)]


def check_engine_mesh(mesh: Mesh):
    """An engine runs on a mesh with the one axis "tp" (replicas are separate engines)."""
    if tuple(mesh.axis_names) != (TP,):
        raise ValueError(f"an engine mesh has the one axis {TP!r}, got axes {tuple(mesh.axis_names)} "
                         "(see jaxserve.parallel.replica_meshes)")


def single_engine_mesh(mesh: Mesh | MeshSpec | str | None) -> Mesh | None:
    """A Mesh, MeshSpec or "tp=N" text -> the mesh of one engine (None: one device, no mesh).
    dp > 1 means several engines, which the server builds, so it is refused here."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    spec = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    if spec.dp > 1:
        raise ValueError(f"mesh {spec}: one engine runs on one replica; dp > 1 (several replicas) "
                         "is a server feature (jaxserve serve --mesh)")
    return None if spec.tp == 1 else replica_meshes(spec)[0]
