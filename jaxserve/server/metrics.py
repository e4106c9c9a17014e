"""Prometheus metrics, named as vLLM names them (`vllm:` -> `jaxserve:`), served on their own port.

Gauges about the engines (running, waiting, KV usage) are read when Prometheus scrapes; the rest
are recorded per request by the service as tokens stream out.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets in seconds (CPU decode steps are ~0.1-0.5 s; accelerators far less).
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_PREFIX = "jaxserve:"


class ServerMetrics:
    def __init__(self, engines):
        self.registry = registry = CollectorRegistry()
        self.ttft = Histogram(_PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY, registry=registry)
        self.itl = Histogram(_PREFIX + "inter_token_latency_seconds", "Time between streamed tokens.",
                             buckets=_LATENCY, registry=registry)
        self.e2e = Histogram(_PREFIX + "e2e_request_latency_seconds", "Arrival to finish of a request.",
                             buckets=_LATENCY, registry=registry)
        self.queue_time = Histogram(_PREFIX + "request_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=_LATENCY, registry=registry)
        self.prompt_tokens = Counter(_PREFIX + "prompt_tokens", "Prefill tokens processed.", registry=registry)
        self.generation_tokens = Counter(_PREFIX + "generation_tokens", "Generated tokens.", registry=registry)
        self.prefix_cache_queries = Counter(_PREFIX + "prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.", registry=registry)
        self.prefix_cache_hits = Counter(_PREFIX + "prefix_cache_hits",
                                         "Prompt tokens served from the prefix cache.", registry=registry)
        self.request_success = Counter(_PREFIX + "request_success", "Finished requests by reason.",
                                       ["finished_reason"], registry=registry)
        self.request_failure = Counter(_PREFIX + "request_failure", "Requests that ended in a gRPC error.",
                                       ["code"], registry=registry)
        running = Gauge(_PREFIX + "num_requests_running", "Requests in the running batch.", registry=registry)
        waiting = Gauge(_PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", registry=registry)
        usage = Gauge(_PREFIX + "kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", registry=registry)
        # Read at scrape time without locking: ints and list lengths, at worst one step stale.
        running.set_function(lambda: sum(e.scheduler.num_running for e in engines))
        waiting.set_function(lambda: sum(e.scheduler.num_waiting for e in engines))
        usage.set_function(lambda: sum(e.block_manager.usage for e in engines) / len(engines))

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Starts the /metrics HTTP endpoint on a daemon thread; returns the server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def record_finish(self, usage, finish_reason: str, e2e_s: float, queue_time_s: float | None) -> None:
        self.e2e.observe(e2e_s)
        if queue_time_s is not None:
            self.queue_time.observe(queue_time_s)
        self.prompt_tokens.inc(usage.prompt_tokens - usage.cached_prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.prefix_cache_queries.inc(usage.prompt_tokens)
        self.prefix_cache_hits.inc(usage.cached_prompt_tokens)
        self.request_success.labels(finished_reason=finish_reason).inc()
