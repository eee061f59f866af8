"""Prometheus metrics at /metrics, all named agent_memory_*.

Counts that must survive restarts (bakes by result, queue depth, probe accuracy) are read from the
database at scrape time; timings of this process (bake and swap durations) are histograms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .store import STATUSES

if TYPE_CHECKING:
    from .daemon import Daemon

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, daemon: "Daemon"):
        self.registry = CollectorRegistry()
        self.bake_duration = Histogram(
            "agent_memory_bake_duration_seconds", "Wall time of a bake, queue to verdict",
            buckets=(15, 30, 60, 120, 300, 600, 1200, 3600), registry=self.registry)
        self.swap_duration = Histogram(
            "agent_memory_swap_duration_seconds", "Time to hot-swap `memory` on all endpoints",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=self.registry)
        self.registry.register(_StoreCollector(daemon))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon

    def collect(self):
        store = self.daemon.store
        queue = GaugeMetricFamily("agent_memory_queue_items", "Items by state", labels=["state"])
        counts = store.counts_by_status()
        for state in STATUSES:
            queue.add_metric([state], counts.get(state, 0))
        yield queue

        bakes = CounterMetricFamily("agent_memory_bakes", "Finished bakes by result", labels=["result"])
        for result, n in store.bake_results().items():
            bakes.add_metric([result], n)
        yield bakes

        accuracy = GaugeMetricFamily("agent_memory_probe_accuracy_ratio",
                                     "Share of probes answered right by the live version",
                                     labels=["probe_set"])
        for probe_set, ratio in store.live_probe_accuracy().items():
            accuracy.add_metric([probe_set], ratio)
        yield accuracy

        serving = self.daemon.serving
        yield GaugeMetricFamily("agent_memory_vllm_up", "1 if every model endpoint is healthy",
                                value=float(bool(serving and serving.healthy())))
        yield CounterMetricFamily("agent_memory_vllm_restarts", "vLLM restarts by the daemon",
                                  value=serving.restarts if serving else 0)
        live = self.daemon.versions.current()
        yield GaugeMetricFamily("agent_memory_live_version", "Number of the live adapter version",
                                value=int(live[1:]))
