"""Prometheus metrics of one server: the scheduler's measurements (an Observer) and the HTTP statuses.

Each server has its own CollectorRegistry, so several servers in one process (a desktop
app, the tests) do not mix their counts. GET /metrics returns `Metrics.render()`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..scheduler import Observer

# Seconds: from a few milliseconds (small models, cache hits) to a minute (long prompts on big ones).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics(Observer):
    """The server's metrics; the scheduler reports to it from its thread (prometheus_client is thread-safe).

    Args:
        scheduler: read for the queue depth and live sequences when scraped.
        cache: a StateCache (or None), read for its size when scraped.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler=None, cache=None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rwkvcpu_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("rwkvcpu_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("rwkvcpu_cached_prompt_tokens",
                                     "Prompt tokens resumed from the state cache instead of read", registry=r)
        self.generated_tokens = Counter("rwkvcpu_generated_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram("rwkvcpu_batch_size", "Sequences per model step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_seconds = Histogram("rwkvcpu_step_seconds", "Time of one model step", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.ttft = Histogram("rwkvcpu_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("rwkvcpu_inter_token_latency_seconds", "Between a sequence's consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("rwkvcpu_cache_hits", "Requests that resumed from a cached prefix", registry=r)
        self.cache_misses = Counter("rwkvcpu_cache_misses", "Requests with no cached prefix", registry=r)
        if scheduler is not None:
            self.watch(scheduler, cache)

    def watch(self, scheduler, cache=None) -> None:
        """Report the scheduler's queue and live sequences, and the cache's size, when scraped."""
        r = self.registry
        Gauge("rwkvcpu_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: scheduler.waiting)
        Gauge("rwkvcpu_active_sequences", "Sequences in state slots", registry=r).set_function(
            lambda: scheduler.active)
        if cache is not None:
            Gauge("rwkvcpu_cache_bytes", "Bytes held by the state cache", registry=r).set_function(
                lambda: cache.nbytes)
            Gauge("rwkvcpu_cache_entries", "States held by the state cache", registry=r).set_function(
                lambda: len(cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------- Observer

    def on_step(self, sequences, decode_tokens, prefill_tokens, seconds):
        self.batch_size.observe(sequences)
        self.step_seconds.observe(seconds)

    def on_first_token(self, seconds):
        self.ttft.observe(seconds)

    def on_token_gap(self, seconds):
        self.itl.observe(seconds)

    def on_request_done(self, prompt_tokens, cached_tokens, completion_tokens):
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.generated_tokens.inc(completion_tokens)

    def on_cache_lookup(self, hit, tokens):
        (self.cache_hits if hit else self.cache_misses).inc()
