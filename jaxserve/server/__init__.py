"""The gRPC front end: `start_engines(...)` builds one engine per data-parallel replica on its
mesh; `serve(...)` runs the jaxserve.v1 service over them until SIGTERM."""
from __future__ import annotations

import logging

from jaxserve.server.app import Server, ServerConfig, serve
from jaxserve.server.pool import EnginePool
from jaxserve.server.service import ServingInfo

log = logging.getLogger(__name__)
__all__ = ["EnginePool", "Server", "ServerConfig", "ServingInfo", "serve", "start_engines"]


def start_engines(model: str, dtype: str, engine_config, mesh: str | None, max_queued_requests: int,
                  progress: bool = True) -> tuple[EnginePool, ServingInfo]:
    """Loads `model` once, then builds an Engine per replica of `mesh` ("tp=2,dp=2"; None: one device)."""
    import jax

    from jaxserve.checkpoint import load_model
    from jaxserve.engine.engine import Engine
    from jaxserve.parallel import parse_mesh, replica_meshes

    spec = parse_mesh(mesh)  # ValueError with a one-line message on bad text
    meshes = replica_meshes(spec)
    loaded = load_model(model, dtype=dtype, progress=progress)
    engines = []
    for i, replica_mesh in enumerate(meshes):
        log.info("starting engine replica %d/%d on devices %s", i + 1, len(meshes),
                 [d.id for d in replica_mesh.devices.flat])
        engines.append(Engine(loaded, engine_config, mesh=replica_mesh))
    info = ServingInfo(model_name=model, platform=jax.default_backend(), mesh=f"tp={spec.tp},dp={spec.dp}",
                       num_devices=spec.tp * spec.dp, max_queued_requests=max_queued_requests)
    return EnginePool(engines, max_queued_requests), info
