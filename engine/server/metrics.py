"""Prometheus metrics of the server (GET /metrics), named like vLLM's with a `flashgen:` prefix.

Gauges and counters are read at scrape time from the engine thread's latest snapshot (AsyncEngine.stats);
latency histograms are observed on the event loop as tokens arrive.
"""
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets in seconds: from one fast decode step to a long queue wait.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """One registry per server (so several servers in one process, as in tests, do not collide)."""

    def __init__(self, model_name):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.stats = lambda: {}
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("flashgen:time_to_first_token_seconds", "Time from arrival to a sample's first token",
                              buckets=sorted(set(_TOKEN_BUCKETS + _REQUEST_BUCKETS)), **labels).labels(model_name)
        self.itl = Histogram("flashgen:inter_token_latency_seconds", "Time between two tokens of a sample",
                             buckets=_TOKEN_BUCKETS, **labels).labels(model_name)
        self.e2e = Histogram("flashgen:e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_REQUEST_BUCKETS, **labels).labels(model_name)
        self.registry.register(self)

    def observe_token(self, seconds, first):
        (self.ttft if first else self.itl).observe(seconds)

    def observe_request(self, seconds):
        self.e2e.observe(seconds)

    def collect(self):
        """prometheus_client's collector protocol: the engine's gauges and counters."""
        s = self.stats()
        if not s:
            return
        for kind, name, doc, key in (
                (GaugeMetricFamily, "num_requests_running", "Requests with a sequence in the running batch", "running"),
                (GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled", "waiting"),
                (GaugeMetricFamily, "kv_cache_usage_perc", "Share of KV cache blocks in use (0 to 1)", "kv_usage"),
                (GaugeMetricFamily, "kv_cache_free_blocks", "KV cache blocks free (cached prefixes included)",
                 "free_blocks"),
                (GaugeMetricFamily, "kv_cache_num_blocks", "KV cache blocks in all", "num_blocks"),
                (CounterMetricFamily, "prefix_cache_queries", "Full prompt blocks looked up in the prefix cache",
                 "prefix_queries"),
                (CounterMetricFamily, "prefix_cache_hits", "Full prompt blocks found in the prefix cache",
                 "prefix_hits"),
                (CounterMetricFamily, "prompt_tokens", "Prompt tokens of the requests added", "prompt_tokens"),
                (CounterMetricFamily, "generation_tokens", "Tokens generated", "generation_tokens"),
                (CounterMetricFamily, "num_preemptions", "Sequences preempted for KV blocks", "preemptions")):
            family = kind(f"flashgen:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], s[key])
            yield family

    def render(self):
        return generate_latest(self.registry)
