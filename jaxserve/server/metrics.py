"""Prometheus metrics, named as vLLM names them (`vllm:` -> `jaxserve:`), served on their own port.
Every series carries the `model_name` label, as vLLM's do.

Gauges about the engines (running, waiting, KV usage) are read when Prometheus scrapes; the rest
are recorded per request by the service as tokens stream out. Label values are the server's own
(model name, finish reasons, gRPC codes), never client-supplied strings.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

# Latency buckets in seconds (CPU decode steps are ~0.1-0.5 s; accelerators far less).
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_PREFIX = "jaxserve:"
_MODEL = ("model_name",)


class ServerMetrics:
    """pool: the EnginePool (its lock-free `snapshot()` feeds the gauges)."""

    def __init__(self, pool, model_name: str):
        self.registry = registry = CollectorRegistry()
        self.model_name = model_name

        def histogram(name, doc):
            return Histogram(_PREFIX + name, doc, _MODEL, buckets=_LATENCY, registry=registry).labels(model_name)

        def counter(name, doc):
            return Counter(_PREFIX + name, doc, _MODEL, registry=registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between streamed tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish of a request.")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self._success = Counter(_PREFIX + "request_success", "Finished requests by reason.",
                                _MODEL + ("finished_reason",), registry=registry)
        self._failure = Counter(_PREFIX + "request_failure", "Requests that ended in a gRPC error.",
                                _MODEL + ("code",), registry=registry)
        registry.register(_PoolGauges(pool, model_name))

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Starts the /metrics HTTP endpoint on a daemon thread; returns the server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def record_failure(self, code: str) -> None:
        """code: a grpc.StatusCode name."""
        self._failure.labels(self.model_name, code).inc()

    def record_finish(self, usage, finish_reason: str, e2e_s: float, queue_time_s: float | None) -> None:
        self.e2e.observe(e2e_s)
        if queue_time_s is not None:
            self.queue_time.observe(queue_time_s)
        self.prompt_tokens.inc(usage.prompt_tokens - usage.cached_prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.prefix_cache_queries.inc(usage.prompt_tokens)
        self.prefix_cache_hits.inc(usage.cached_prompt_tokens)
        self._success.labels(self.model_name, finish_reason).inc()


class _PoolGauges:
    """The engines' gauges, from one snapshot of the pool per scrape (so they agree with each other)."""
    GAUGES = {"num_requests_running": ("Requests in the running batch.", lambda s: s.running),
              "num_requests_waiting": ("Requests waiting to be scheduled.", lambda s: s.waiting),
              "kv_cache_usage_perc": ("Fraction of KV pages in use (1 = full).", lambda s: s.kv_cache_usage),
              # Disaggregated serving (0 when colocated). Totals are gauges of the engines' own counters.
              "kv_exports_pinned": ("Prefilled requests whose pages wait for a decode engine.",
                                    lambda s: s.exports_pinned),
              "kv_imports_in_flight": ("Requests whose KV pages are on the way to a decode engine.",
                                       lambda s: s.imports_in_flight),
              "kv_transfers_completed": ("KV page transfers written on the decode side.", lambda s: s.transfers_completed),
              "kv_transfer_failures": ("KV transfers that failed or timed out (recomputed).", lambda s: s.transfer_failures),
              "kv_transfer_bytes": ("Bytes of KV pages transferred.", lambda s: s.transfer_bytes),
              "kv_transfer_seconds": ("Seconds spent in KV transfers (fetch to written), summed.",
                                      lambda s: s.transfer_seconds),
              "kv_exports_expired": ("Pinned pages freed because no decode engine confirmed them.",
                                     lambda s: s.exports_expired),
              "kv_imports_refused": ("Import attempts a full decode engine refused (each is retried).",
                                     lambda s: s.imports_refused)}

    def __init__(self, pool, model_name: str):
        self.pool, self.model_name = pool, model_name

    def describe(self):
        return [GaugeMetricFamily(_PREFIX + name, doc, labels=_MODEL) for name, (doc, _) in self.GAUGES.items()]

    def collect(self):
        snapshot = self.pool.snapshot()
        for name, (doc, read) in self.GAUGES.items():
            family = GaugeMetricFamily(_PREFIX + name, doc, labels=_MODEL)
            family.add_metric([self.model_name], float(read(snapshot)))
            yield family
