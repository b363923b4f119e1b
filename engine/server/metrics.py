"""Prometheus metrics of the gRPC server, with vLLM's metric names under the ``aspen:`` prefix.

vLLM exports ``vllm:num_requests_running`` etc.; ASPEN exports the same names with ``aspen:`` instead, so a
dashboard or router built for vLLM works after replacing the prefix:

========================================  =========  ====================================================
name                                      type       meaning
========================================  =========  ====================================================
aspen:num_requests_running                gauge      requests in the running batch
aspen:num_requests_waiting                gauge      requests in the waiting queue
aspen:kv_cache_usage_perc                 gauge      fraction (0..1) of KV blocks in use (as vLLM)
aspen:kv_blocks_used                      gauge      KV blocks held by requests (0 when idle: no leak)
aspen:adapter_pins_in_use                 gauge      adapter pins held by running requests (0 when idle)
aspen:lora_requests_info                  gauge      labels running_lora_adapters, waiting_lora_adapters,
                                                     max_lora; value = scrape time (as vLLM)
aspen:time_to_first_token_seconds         histogram  arrival -> first generated token
aspen:inter_token_latency_seconds         histogram  gap between successive token deliveries
aspen:e2e_request_latency_seconds         histogram  arrival -> finished
aspen:request_queue_time_seconds          histogram  arrival -> first scheduled
aspen:prompt_tokens_total                 counter    prompt tokens of handled requests
aspen:generation_tokens_total             counter    tokens generated (cancelled requests included)
aspen:request_success_total               counter    finished requests by finished_reason
aspen:adapter_cache_hits_total            counter    per adapter: acquires that found it on the device
aspen:adapter_cache_loads_total           counter    per adapter: disk -> host reads
aspen:adapter_cache_device_loads_total    counter    per adapter: host -> device copies
aspen:adapter_cache_evictions_total       counter    per adapter and tier (host/device)
aspen:adapter_cache_misses_total          counter    acquires that had to load
aspen:adapter_cache_request_hits_total    counter    requests whose adapter was on the device on arrival
aspen:adapter_cache_request_misses_total  counter    requests whose adapter had to be loaded on arrival
aspen:adapter_cache_load_failures_total   counter    adapter reads that failed
aspen:adapter_load_seconds_total          counter    time spent reading / copying adapters
aspen:adapter_page_waits_total            counter    admissions that waited for device adapter pages (the
                                                     pool held by running requests' adapters: CACHE_FULL)
aspen:kv_block_waits_total                counter    admissions that waited for KV blocks
========================================  =========  ====================================================

Histograms and counters carry a ``model_name`` label, as in vLLM. Gauges are read from the engine at scrape
time by a custom collector, so they are never stale. Each :class:`ServerMetrics` owns its own
``CollectorRegistry``, so several servers can live in one process (tests).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

PREFIX = "aspen:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class EngineCollector:
    """Reads gauges and adapter-cache counters from the engine at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.engine: LLMEngine | None = None  # set once the model is loaded

    def describe(self):  # no fixed description: the families depend on the engine being loaded
        return []

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def collect(self):
        engine = self.engine
        if engine is None:
            return
        sched, blocks = engine.scheduler, engine.block_manager
        running, waiting = sched.running, sched.waiting
        yield self._gauge("num_requests_running", "Requests in the running batch.", len(running))
        yield self._gauge("num_requests_waiting", "Requests in the waiting queue.", len(waiting))
        yield self._gauge("kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.", blocks.usage)
        yield self._gauge("kv_blocks_used", "KV blocks held by requests.", blocks.num_used_blocks)
        cache = engine.adapter_cache
        yield self._gauge("adapter_pins_in_use", "Adapter pins held by running requests.",
                          cache.pinned_count() if cache is not None else 0)
        info = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on LoRA requests.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        names = (",".join(sorted({r.adapter_id for r in reqs if r.adapter_id})) for reqs in (running, waiting))
        # no per-batch adapter limit here: every sequence of a batch may use its own adapter
        info.add_metric([*names, str(engine.config.max_num_seqs)], time.time())
        yield info
        stats = sched.stats()
        yield CounterMetricFamily(PREFIX + "adapter_page_waits", "Admissions that waited for device adapter "
                                  "pages.", value=stats.num_adapter_waits)
        yield CounterMetricFamily(PREFIX + "kv_block_waits", "Admissions that waited for KV blocks.",
                                  value=stats.num_kv_waits)
        if cache is not None:
            yield from self._adapter_cache(cache.stats())

    def _adapter_cache(self, stats):
        per = stats.per_adapter
        families = {
            "hits": CounterMetricFamily(PREFIX + "adapter_cache_hits", "Acquires that found the adapter on the "
                                        "device.", labels=["adapter"]),
            "loads": CounterMetricFamily(PREFIX + "adapter_cache_loads", "Adapter reads from disk to host.",
                                         labels=["adapter"]),
            "device_loads": CounterMetricFamily(PREFIX + "adapter_cache_device_loads", "Adapter copies from host "
                                                "to device.", labels=["adapter"]),
        }
        evictions = CounterMetricFamily(PREFIX + "adapter_cache_evictions", "Adapter evictions.",
                                        labels=["adapter", "tier"])
        for aid, c in sorted(per.items()):
            for key, fam in families.items():
                fam.add_metric([aid], getattr(c, key))
            evictions.add_metric([aid, "host"], c.evictions_host)
            evictions.add_metric([aid, "device"], c.evictions_device)
        yield from families.values()
        yield evictions
        for name, doc, value in (("adapter_cache_misses", "Acquires that had to load the adapter.", stats.misses),
                                 ("adapter_cache_request_hits", ("Requests whose adapter was on the device when "
                                  "they arrived."), stats.request_hits),
                                 ("adapter_cache_request_misses", ("Requests whose adapter had to be loaded when "
                                  "they arrived."), stats.request_misses),
                                 ("adapter_cache_load_failures", "Adapter loads that failed.",
                                  stats.load_failures),
                                 ("adapter_load_seconds", "Seconds spent loading adapters.", stats.load_seconds)):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "adapter_cache_host_bytes", "Host memory held by adapters.",
                                value=stats.bytes_host)
        yield GaugeMetricFamily(PREFIX + "adapter_cache_device_pages_used", "Device pool pages held by adapters.",
                                value=stats.pages_device)


class ServerMetrics:
    """All metrics of one server, in a registry of its own."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.collector = EngineCollector(model_name)
        self.registry.register(self.collector)
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        _TOKEN_GAP_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.",
                        _LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Histogram of time spent waiting in the queue.",
                          _LATENCY_BUCKETS)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=self.registry).labels(model_name)
        self.success = Counter(PREFIX + "request_success", "Count of finished requests by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self._http = None
        self._http_thread = None

    def bind_engine(self, engine: LLMEngine) -> None:
        self.collector.engine = engine

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    # ------------------------------------------------------------------ HTTP endpoint
    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port (0 = a free port); returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class RequestTracker:
    """Observes one request's outputs as they are delivered; :meth:`close` records what it saw."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.last: RequestOutput | None = None
        self._last_token_at: float | None = None

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.delta_token_ids:
            if self._last_token_at is not None:
                self.m.itl.observe(now - self._last_token_at)
            self._last_token_at = now
        self.last = out

    def close(self) -> None:
        """Record counters and engine-side latencies (the engine stamps arrival/first token/finish)."""
        out = self.last
        if out is None:
            return
        self.m.prompt_tokens.inc(out.prompt_tokens)
        self.m.generation_tokens.inc(out.completion_tokens)
        t = out.metrics
        arrival = t.get("arrival")
        if arrival is None:
            return
        if "first_scheduled" in t:
            self.m.queue.observe(max(0.0, t["first_scheduled"] - arrival))
        if "first_token" in t:
            self.m.ttft.observe(max(0.0, t["first_token"] - arrival))
        if out.finished:
            self.m.success.labels(self.m.model_name, out.finish_reason).inc()
            self.m.e2e.observe(max(0.0, t.get("finished", time.monotonic()) - arrival))
