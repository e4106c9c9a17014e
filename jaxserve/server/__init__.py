"""The gRPC front end: `start_pool(...)` loads the model and starts one engine per data-parallel
replica (jaxserve.engine.load_engines); `serve(...)` runs the jaxserve.v1 service over them until
SIGTERM. The server sees the engines only through EnginePool and EngineInfo."""
from __future__ import annotations

from jaxserve.engine.pool import EnginePool
from jaxserve.parallel.mesh import DisaggMeshSpec, MeshSpec
from jaxserve.server.app import Server, ServerConfig, serve
from jaxserve.server.service import ServingInfo

__all__ = ["EnginePool", "Server", "ServerConfig", "ServingInfo", "serve", "start_pool"]


def start_pool(model: str, dtype: str, engine_config, mesh: MeshSpec | DisaggMeshSpec, max_queued_requests: int,
               progress: bool = True, role: str = "colocated", prefill_servers: tuple[str, ...] = (),
               transfer_host: str = "127.0.0.1") -> tuple[EnginePool, ServingInfo]:
    """Loads `model` once onto the devices of `mesh` and wraps an engine per replica in a pool; a
    disaggregated mesh gets prefill and decode engines in a DisaggPool. role "prefill": a prefill
    server for decode servers (its pool carries the KVHandoff service, `pool.handoff`); role
    "decode": a decode server whose prompts go to `prefill_servers` (jaxserve.disagg.remote)."""
    if isinstance(mesh, DisaggMeshSpec):
        from jaxserve.disagg import DisaggPool
        from jaxserve.engine.build import load_disaggregated_engines

        prefill, decode = load_disaggregated_engines(model, engine_config, mesh, dtype=dtype, progress=progress)
        info = ServingInfo(model_name=model, mesh=str(mesh), num_devices=mesh.num_devices,
                           max_queued_requests=max_queued_requests)
        return DisaggPool(prefill, decode, max_queued_requests), info
    from jaxserve.engine.build import load_engines

    engines = load_engines(model, engine_config, mesh, dtype=dtype, progress=progress)
    info = ServingInfo(model_name=model, mesh=str(mesh), num_devices=mesh.num_devices,
                       max_queued_requests=max_queued_requests)
    if role == "decode":
        from jaxserve.disagg.remote import RemotePrefillPool

        return RemotePrefillPool(engines, list(prefill_servers), max_queued_requests, transfer_host), info
    pool = EnginePool(engines, max_queued_requests)
    if role == "prefill":
        from jaxserve.disagg.remote import KVHandoffService
        from jaxserve.disagg.wire import KVSender

        pool.role = "prefill"
        for engine in engines:
            engine.prepare_transfers()
        sender = KVSender(host=transfer_host, ttl_s=engine_config.kv_export_lease_timeout)
        pool.handoff = KVHandoffService(pool, sender, model, engine_config.kv_export_lease_timeout)
    return pool, info
