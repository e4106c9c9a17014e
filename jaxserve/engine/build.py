"""Engines from a model name and a mesh: the one way the server, the offline LLM and batch jobs
start engines. The model is loaded once, straight into its shardings on the deployment's device
mesh (dp x tp); each data-parallel replica's engine runs on its own row, with a zero-copy view of
the weights there (jaxserve.parallel.placement)."""
from __future__ import annotations

import logging
from pathlib import Path

from jax.sharding import Mesh

from jaxserve.checkpoint import LoadedModel, load_model
from jaxserve.engine.config import EngineConfig
from jaxserve.engine.engine import Engine
from jaxserve.parallel import (DisaggMeshSpec, MeshSpec, as_mesh_spec, check_engine_mesh, device_mesh, replica_meshes,
                               replica_view)

log = logging.getLogger(__name__)


def load_engines(model: str | Path | LoadedModel, config: EngineConfig = EngineConfig(),
                 mesh: MeshSpec | Mesh | str | None = None, dtype: str = "auto", progress: bool = True) -> list[Engine]:
    """One Engine per replica of `mesh`: a MeshSpec, its text ("tp=2,dp=2"), a jax Mesh for one
    engine, or None (one device). A LoadedModel is used where it lies if that is the target (one
    device, or loaded onto this mesh); otherwise each replica gets a copy in its shardings."""
    if isinstance(mesh, Mesh):
        check_engine_mesh(mesh)  # before loading anything
        loaded = _load(model, dtype, progress, mesh)
        return [_start(loaded, config, mesh, 0, 1)]
    spec = as_mesh_spec(mesh)  # ValueError with a one-line message on bad text
    if spec.num_devices == 1:
        return [_start(_load(model, dtype, progress, None), config, None, 0, 1)]
    devices = device_mesh(spec)  # ValueError when there are too few devices, before loading anything
    loaded = _load(model, dtype, progress, devices)
    rows = replica_meshes(devices)
    return [_start(replica_view(loaded, devices, row), config, row, i, len(rows)) for i, row in enumerate(rows)]


def load_disaggregated_engines(model: str | Path, config: EngineConfig, spec: DisaggMeshSpec, dtype: str = "auto",
                               progress: bool = True) -> tuple[list[Engine], list[Engine]]:
    """(prefill engines, decode engines): one per replica of each side, each side on its own devices
    (prefill first) with its own copy of the weights, every engine on a mesh of its devices."""
    import jax

    devices = jax.devices()
    if len(devices) < spec.num_devices:
        raise ValueError(f"--mesh {spec}: needs {spec.num_devices} devices, but only {len(devices)} are available")
    sides, first = [], 0
    for role, side in (("prefill", spec.prefill), ("decode", spec.decode)):
        mesh = device_mesh(side, devices[first:first + side.num_devices])
        first += side.num_devices
        log.info("%s side: --mesh %s on devices %s", role, side, [d.id for d in mesh.devices.flat])
        loaded = _load(model, dtype, progress, mesh)
        rows = replica_meshes(mesh)
        sides.append([_start(replica_view(loaded, mesh, row), config, row, i, len(rows)) for i, row in enumerate(rows)])
    return sides[0], sides[1]


def _load(model, dtype: str, progress: bool, mesh: Mesh | None) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, progress=progress, mesh=mesh)


def _start(model: LoadedModel, config: EngineConfig, mesh: Mesh | None, index: int, count: int) -> Engine:
    devices = [d.id for d in mesh.devices.flat] if mesh is not None else [0]
    log.info("starting engine replica %d/%d on devices %s", index + 1, count, devices)
    return Engine(model, config, mesh)
