"""Disaggregated prefill and decode: prefill engines export a request after its first token and
decode engines import its KV pages (jaxserve.engine.handoff). `DisaggPool` runs both sides in one
process on disjoint devices (`jaxserve serve --mesh "prefill:tp=2 decode:tp=2"`)."""
from jaxserve.disagg.pool import DisaggPool

__all__ = ["DisaggPool"]
