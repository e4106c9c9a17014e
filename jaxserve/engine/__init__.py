"""The front: Engine (add / abort / step / info / stats), AsyncEngine (an engine on its own thread
for asyncio callers), EnginePool (replicas, admission) and load_engines (engines from a model name
and a mesh). Servers and jobs use these and nothing below them.

Names load lazily: `jaxserve.engine.config` and `.outputs` stay importable without jax."""
from __future__ import annotations

_EXPORTS = {
    "Engine": "jaxserve.engine.engine", "kv_bytes_per_page": "jaxserve.engine.engine",
    "EngineConfig": "jaxserve.engine.config", "EngineInfo": "jaxserve.engine.outputs",
    "EngineStats": "jaxserve.engine.outputs", "RequestDelta": "jaxserve.engine.outputs",
    "AsyncEngine": "jaxserve.engine.async_engine", "EngineDeadError": "jaxserve.engine.async_engine",
    "EnginePool": "jaxserve.engine.pool", "QueueFullError": "jaxserve.engine.pool",
    "DuplicateRequestError": "jaxserve.engine.pool", "load_engines": "jaxserve.engine.build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve.engine' has no attribute {name!r}")
