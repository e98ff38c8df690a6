"""Prometheus metrics under `kvgate:`: request latencies and lengths observed as requests finish, engine state
read from the core's latest step stats at scrape time, and HTTP responses counted by a before_send hook."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from engine.outputs import RequestOutput
from engine.protocol import SchedulerStats
from gateway.fields import UnknownFields

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0, 160.0, 640.0)
_LENGTHS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class Metrics:
    def __init__(self, model_name: str, stats: Callable[[], SchedulerStats],
                 alive: Callable[[], bool] = lambda: True) -> None:
        self.registry = CollectorRegistry()
        labels, self._labels = ["model_name"], {"model_name": model_name}

        def histogram(name, doc, buckets):
            return Histogram(f"kvgate:{name}", doc, labels, buckets=buckets, registry=self.registry).labels(
                **self._labels)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY)
        self.itl = histogram("inter_token_latency_seconds", "Time between steps that gave a request tokens.",
                             _LATENCY)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY)
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to first scheduling.", _LATENCY)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length of finished requests.", _LENGTHS)
        self.gen_len = histogram("request_generation_tokens", "Generated tokens of finished requests.", _LENGTHS)
        self.prompt_tokens = Counter("kvgate:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=self.registry).labels(**self._labels)
        self.gen_tokens = Counter("kvgate:generation_tokens", "Generated tokens.", labels,
                                  registry=self.registry).labels(**self._labels)
        self.finished = Counter("kvgate:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.errors = Counter("kvgate:request_errors", "Requests ended without their answer, by cause.",
                              labels + ["cause"], registry=self.registry)
        self.engine_deaths = Counter("kvgate:engine_deaths", "Times the engine core died.", labels,
                                     registry=self.registry).labels(**self._labels)
        self.engine_restarts = Counter("kvgate:engine_restarts", "Times a dead engine core was started again.",
                                       labels, registry=self.registry).labels(**self._labels)
        Gauge("kvgate:engine_alive", "1 while the engine core serves, else 0.", labels,
              registry=self.registry).labels(**self._labels).set_function(lambda: float(alive()))
        self.http = Counter("kvgate:http_responses", "HTTP responses by status code.", ["status"],
                            registry=self.registry)
        self.unknown_fields = UnknownFields(Counter(
            "kvgate:unknown_request_fields", "Top-level request fields ignored as unknown, by name and endpoint.",
            ["field", "endpoint"], registry=self.registry))
        gauges = {name: Gauge(f"kvgate:{name}", doc, labels, registry=self.registry).labels(**self._labels)
                  for name, doc in [("num_requests_running", "Requests in the running batch."),
                                    ("num_requests_waiting", "Requests waiting to be scheduled."),
                                    ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")]}
        # a dead engine's last step stats are not its state: its gauges read 0
        gauges["num_requests_running"].set_function(lambda: stats().num_running if alive() else 0)
        gauges["num_requests_waiting"].set_function(lambda: stats().num_waiting if alive() else 0)
        gauges["kv_cache_usage_perc"].set_function(lambda: stats().kv_cache_usage if alive() else 0.0)
        self.registry.register(_EngineCounters(stats, self._labels))

    def on_request_finished(self, out: RequestOutput, generated_tokens: int) -> None:
        m = out.metrics
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.gen_len.observe(generated_tokens)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.gen_tokens.inc(generated_tokens)
        for c in out.outputs:
            self.finished.labels(finished_reason=c.finish_reason or "abort", **self._labels).inc()

    def on_request_aborted(self, cause: str) -> None:
        """A request that got no (whole) answer: one abort, as vLLM counts it, and one error by cause."""
        self.finished.labels(finished_reason="abort", **self._labels).inc()
        self.errors.labels(cause=cause, **self._labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def count_response(self, message, scope) -> None:
        """A Litestar before_send hook counting every HTTP response by status. A hook, not a middleware:
        middleware wraps only the route handlers, so Litestar's own 404 and 405 (no handler) went uncounted."""
        if message["type"] == "http.response.start":
            self.http.labels(status=str(message["status"])).inc()


class _EngineCounters:
    """Totals the core keeps since start (preemptions, prefix-cache lookups), exposed as counters."""

    def __init__(self, stats: Callable[[], SchedulerStats], labels: dict[str, str]) -> None:
        self._stats, self._labels = stats, labels

    def collect(self):
        s = self._stats()
        for name, doc, value in [
            ("num_preemptions", "Requests preempted (KV blocks freed, recomputed later).", s.num_preemptions),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ]:
            family = CounterMetricFamily(f"kvgate:{name}", doc, labels=list(self._labels))
            family.add_metric(list(self._labels.values()), value)
            yield family
