"""Prometheus metrics for GET /metrics, kept by prometheus_client in one `CollectorRegistry` per server.

Two sets of names: `baleen_*` (the engine's gauges, HTTP counters and latencies, token counts), and SGLang's
`sglang:*` names with a `model_name` label, so dashboards built for SGLang work unchanged. The engine pushes
its scheduler counters into `engine.metrics` (a dict); `EngineCollector` reads it at scrape time. The HTTP
frontend observes the rest through `FrontendMetrics`. No process-wide registry: tests run several servers in
one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST  # the media type of `FrontendMetrics.render`'s page

# engine.metrics key -> (exported name, type, help); a key not listed is exported as the gauge `baleen_<key>`
_ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "num_running_requests": ("baleen_num_running_requests", "gauge", "Requests in the running batch"),
    "num_waiting_requests": ("baleen_num_waiting_requests", "gauge", "Requests queued for admission"),
    "num_used_pages": ("baleen_num_used_pages", "gauge", "KV pages allocated, including evictable prefix-cache pages"),
    "num_free_pages": ("baleen_num_free_pages", "gauge", "KV pages free"),
    "num_cached_pages": ("baleen_num_cached_pages", "gauge", "KV pages held by the radix prefix cache"),
    "num_evictable_pages": ("baleen_num_evictable_pages", "gauge", "Prefix-cache pages no request holds"),
    "token_usage": ("baleen_token_usage", "gauge", "Share of the KV pool allocated (0..1)"),
    "cache_hit_rate": ("baleen_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache (0..1)"),
    "gen_throughput": ("baleen_gen_throughput", "gauge", "Generated tokens per second over the last window"),
    "last_step_time": ("baleen_last_step_time_seconds", "gauge", "Duration of the last engine step"),
    "num_preemptions": ("baleen_num_preemptions_total", "counter", "Requests preempted since start"),
    "num_steps": ("baleen_steps_total", "counter", "Engine steps run"),
    "num_graphed_steps": ("baleen_cuda_graph_steps_total", "counter", "Engine steps that replayed CUDA graphs"),
    "spec_accept_length": ("baleen_spec_accept_length", "gauge",
                           "Speculative decoding: mean tokens committed per verify step (accepted drafts + 1)"),
    "spec_accept_rate": ("baleen_spec_accept_rate", "gauge", "Speculative decoding: accepted / proposed drafts (0..1)"),
    "num_verify_rows": ("baleen_spec_verify_steps_total", "counter", "Speculative verify steps (one per request)"),
    "num_verify_tokens": ("baleen_spec_verify_tokens_total", "counter", "Tokens committed by speculative verify steps"),
    "num_draft_tokens": ("baleen_spec_draft_tokens_total", "counter", "Draft tokens proposed to verify steps"),
    "num_accepted_drafts": ("baleen_spec_accepted_drafts_total", "counter", "Draft tokens the verify steps accepted"),
}

# engine.metrics key -> (SGLang's gauge, help); exported even before the engine's first report (as 0)
_SGLANG_GAUGES: dict[str, tuple[str, str]] = {
    "num_running_requests": ("sglang:num_running_reqs", "The number of running requests"),
    "num_waiting_requests": ("sglang:num_queue_reqs", "The number of requests in the waiting queue"),
    "gen_throughput": ("sglang:gen_throughput", "The generation throughput (token/s)"),
    "cache_hit_rate": ("sglang:cache_hit_rate", "The prefix cache hit rate"),
    "token_usage": ("sglang:token_usage", "The token usage (share of the KV pool allocated)"),
    "spec_accept_length": ("sglang:spec_accept_length", "The average acceptance length of speculative decoding"),
    "spec_accept_rate": ("sglang:spec_accept_rate", "The acceptance rate of speculative decoding (accepted / drafts)"),
}

# Seconds; HTTP latency spans a whole request (a stream included), TTFT only up to the first token.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# SGLang's default buckets for its three request latencies, so its dashboards' quantiles read the same.
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                       200.0, 400.0)
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1,
                      0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)
SGLANG_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                      200.0, 400.0, 600.0, 1200.0, 1800.0, 2400.0)


class EngineCollector:
    """The engine's gauges, read from `engine.metrics` at scrape time: `baleen_*` and SGLang's names."""

    def __init__(self, model_name: str, engine_metrics: Callable[[], Mapping[str, float]],
                 healthy: Callable[[], bool]) -> None:
        self.model_name, self.engine_metrics, self.healthy = model_name, engine_metrics, healthy

    def collect(self) -> Iterator[Metric]:
        """One family per engine metric; called by the registry on every scrape."""
        metrics = self.engine_metrics()
        yield GaugeMetricFamily("baleen_healthy", "1 when the engine can serve requests", value=int(self.healthy()))
        used, evictable = metrics.get("num_used_pages"), metrics.get("num_evictable_pages")
        if used is not None:
            # NOTE: pages held by live requests; evictable prefix-cache pages are free to reclaim, so this
            # returns to 0 when the server is idle (the leak check of the soak test reads it).
            yield GaugeMetricFamily("baleen_pages_used", "KV pages held by requests (used minus evictable cache pages)",
                                    value=used - (evictable or 0.0))
        for key, value in sorted(metrics.items()):
            name, kind, help = _ENGINE_METRICS.get(key, (f"baleen_{key}", "gauge", f"engine metric {key}"))
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help, value=value)
        for key, (name, help) in _SGLANG_GAUGES.items():
            gauge = GaugeMetricFamily(name, help, labels=("model_name",))
            gauge.add_metric((self.model_name,), metrics.get(key, 0.0))
            yield gauge


class FrontendMetrics:
    """The registry of one server: the engine's gauges, and what its HTTP frontend counts and times."""

    def __init__(self, model_name: str, engine_metrics: Callable[[], Mapping[str, float]],
                 healthy: Callable[[], bool]) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(EngineCollector(model_name, engine_metrics, healthy))
        self.requests = Counter("baleen_http_requests_total", "HTTP requests answered, by method, route and status",
                                ("method", "route", "status"), registry=registry)
        self.in_flight = Gauge("baleen_http_requests_in_flight", "HTTP requests being answered now", registry=registry)
        self.latency = Histogram("baleen_http_request_duration_seconds", "Time from request start to the end of its body",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("baleen_time_to_first_token_seconds", "Time from HTTP request start to its first token",
                              ("route",), buckets=TTFT_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("baleen_prompt_tokens_total", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generation_tokens = Counter("baleen_generation_tokens_total", "Tokens generated for finished requests",
                                         registry=registry)
        self.finished = Counter("baleen_requests_finished_total", "Engine requests (one per choice) by finish reason",
                                ("finish_reason",), registry=registry)

        # SGLang's per-request series: one engine request per choice, labelled with the served model's name.
        def sglang_histogram(name: str, help: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help, ("model_name",), buckets=buckets, registry=registry)

        def sglang_counter(name: str, help: str) -> Counter:
            return Counter(name, help, ("model_name",), registry=registry)

        self.sglang_ttft = sglang_histogram("sglang:time_to_first_token_seconds",
                                            "Histogram of time to first token in seconds.",
                                            SGLANG_TTFT_BUCKETS).labels(model_name)
        self.sglang_itl = sglang_histogram("sglang:inter_token_latency_seconds",
                                           "Histogram of inter-token latency in seconds.",
                                           SGLANG_ITL_BUCKETS).labels(model_name)
        self.sglang_e2e = sglang_histogram("sglang:e2e_request_latency_seconds",
                                           "Histogram of End-to-end request latency in seconds",
                                           SGLANG_E2E_BUCKETS).labels(model_name)
        self.sglang_prompt_tokens = sglang_counter("sglang:prompt_tokens_total",
                                                   "Number of prefill tokens processed.").labels(model_name)
        self.sglang_generation_tokens = sglang_counter("sglang:generation_tokens_total",
                                                       "Number of generation tokens processed.").labels(model_name)
        self.sglang_requests = sglang_counter("sglang:num_requests_total",
                                              "Number of requests processed.").labels(model_name)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request finished (its whole body sent)."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_ttft(self, route: str, seconds: float) -> None:
        """The first tokens of a generation HTTP request (all its choices) reached the frontend."""
        self.ttft.labels(route).observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        """One engine request's first output arrived, `seconds` after its HTTP request started."""
        self.sglang_ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        """An output of `num_tokens` tokens arrived `seconds` after the previous one of its request: each token
        counts as one observation of `seconds / num_tokens` (SGLang's convention), so _sum stays wall time."""
        for _ in range(num_tokens):
            self.sglang_itl.observe(seconds / num_tokens)

    def observe_finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                         e2e_seconds: float | None = None) -> None:
        """One engine request (one choice) ended; `e2e_seconds` from its HTTP request's start to its last output
        (None for a request the client abandoned, or one the engine failed)."""
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.sglang_requests.inc()
        self.sglang_prompt_tokens.inc(prompt_tokens)
        self.sglang_generation_tokens.inc(completion_tokens)
        if e2e_seconds is not None:
            self.sglang_e2e.observe(e2e_seconds)

    def render(self) -> bytes:
        """The whole /metrics page in the Prometheus text format (its media type is `CONTENT_TYPE`)."""
        return prometheus_client.generate_latest(self.registry)
