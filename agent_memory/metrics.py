"""Prometheus metrics at /metrics, all named agent_memory_*.

Counts that must survive restarts (bakes by result, queue depth, probe accuracy) are read from the
database at scrape time; timings of this process (bake and swap durations) are histograms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__
from .records import PASSED, ItemStatus
from .store import Store
from .versions import Versions

if TYPE_CHECKING:
    from .bakery import Bakery
    from .serving import Serving

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The registry /metrics renders. `serving` returns the model server (None until it is up);
    the bake and swap histograms are observed by the daemon when the bakery reports them."""

    def __init__(self, store: Store, versions: Versions, bakery: "Bakery", serving: Callable[[], "Serving | None"]):
        self.registry = CollectorRegistry()
        self.bake_duration = Histogram(
            "agent_memory_bake_duration_seconds", "Wall time of a bake, queue to verdict",
            buckets=(15, 30, 60, 120, 300, 600, 1200, 3600), registry=self.registry)
        self.swap_duration = Histogram(
            "agent_memory_swap_duration_seconds", "Time to hot-swap `memory` on all endpoints",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=self.registry)
        self.registry.register(_StoreCollector(store, versions, bakery, serving))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    def __init__(self, store: Store, versions: Versions, bakery: "Bakery", serving: Callable[[], "Serving | None"]):
        self.store, self.versions, self.bakery, self.serving = store, versions, bakery, serving

    def collect(self):
        store = self.store
        queue = GaugeMetricFamily("agent_memory_queue_items", "Items by state", labels=["state"])
        counts = store.counts_by_status()
        for state in ItemStatus:
            queue.add_metric([state], counts.get(state, 0))
        yield queue

        bakes = CounterMetricFamily("agent_memory_bakes", "Finished bakes by result", labels=["result"])
        for result, n in store.bake_results().items():
            bakes.add_metric([result], n)
        yield bakes

        live = self.versions.current()
        accuracy = GaugeMetricFamily("agent_memory_probe_accuracy_ratio",
                                     "Share of probes answered right by the live version",
                                     labels=["probe_set"])
        for probe_set, ratio in store.live_probe_accuracy(live).items():
            accuracy.add_metric([probe_set], ratio)
        yield accuracy

        info = GaugeMetricFamily("agent_memory_build_info", "The running agent-memory", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        last_ok = store.last_bake_finished(verdicts=(PASSED,))
        yield GaugeMetricFamily("agent_memory_last_live_bake_timestamp_seconds",
                                "When the last bake that went live finished (0: none yet)", value=last_ok or 0.0)
        stage = GaugeMetricFamily("agent_memory_bake_stage", "1 for the stage the running bake is in",
                                  labels=["stage"])
        bakery = self.bakery
        if bakery.running is not None and bakery.stage:
            stage.add_metric([bakery.stage.split(" ")[0]], 1.0)
        yield stage
        feeds = GaugeMetricFamily("agent_memory_feed_failures", "Consecutive failed polls per feed",
                                  labels=["feed"])
        for feed in store.list_feeds():
            feeds.add_metric([str(feed["id"])], feed.get("failures") or 0)
        yield feeds

        serving = self.serving()
        yield GaugeMetricFamily("agent_memory_vllm_up", "1 if every model endpoint is healthy",
                                value=float(bool(serving and serving.healthy())))
        yield CounterMetricFamily("agent_memory_vllm_restarts", "vLLM restarts by the daemon",
                                  value=serving.restarts if serving else 0)
        yield GaugeMetricFamily("agent_memory_live_version", "Number of the live adapter version",
                                value=live.number)
