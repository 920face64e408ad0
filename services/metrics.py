"""Prometheus metrics of one shard, served over HTTP when a port is given.

Counters and the RPC latency histogram are updated by the servicer; versions, group
steps, pending contributions and the groups active are read from the store at scrape
time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from psfw.services.store import ShardStore


class _StoreCollector(Collector):
    def __init__(self, store: ShardStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self.store
        shard = str(store.shard)
        held = GaugeMetricFamily("psfw_shard_bytes", "bytes of parameter values the shard holds", labels=["shard"])
        held.add_metric([shard], store.nbytes())
        slices = GaugeMetricFamily("psfw_shard_slices", "parameter slices the shard holds", labels=["shard"])
        slices.add_metric([shard], len(store.specs))
        version = GaugeMetricFamily(
            "psfw_slice_version_max", "highest slice version (updates applied)", labels=["shard"]
        )
        version.add_metric([shard], max(store.versions.values(), default=0))
        step = GaugeMetricFamily("psfw_group_step", "completed steps of each group", labels=["shard", "group"])
        pending = GaugeMetricFamily(
            "psfw_pending_workers", "workers reported for each group's step in progress", labels=["shard", "group"]
        )
        for group, state in sorted(store.groups.items()):
            step.add_metric([shard, str(group)], state.step)
            pending.add_metric([shard, str(group)], state.round.workers if state.round else 0)
        applied = CounterMetricFamily("psfw_updates_applied", "group steps applied", labels=["shard"])
        applied.add_metric([shard], store.updates_applied)
        active = GaugeMetricFamily(
            "psfw_groups_active",
            "groups that count now: the job's groups and those that joined, but the gone ones",
            labels=["shard"],
        )
        active.add_metric([shard], len(store.presence.counted()))
        yield from (held, slices, version, step, pending, applied, active)
        yield from _table_metrics(store)


def _table_metrics(store: ShardStore) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Rows held, rows the last update touched and bytes, per embedding table; rows
    admitted, expired and evicted, and the ids waiting for admission."""
    shard, labels = str(store.shard), ["shard", "table"]
    rows = GaugeMetricFamily("psfw_table_rows", "embedding-table rows the shard holds", labels=labels)
    touched = GaugeMetricFamily("psfw_table_rows_touched", "rows the last update of the table changed", labels=labels)
    size = GaugeMetricFamily("psfw_table_bytes", "bytes of the rows held and their optimizer state", labels=labels)
    waiting = GaugeMetricFamily("psfw_table_ids_waiting", "ids used that wait for admission", labels=labels)
    gone = {
        what: CounterMetricFamily(f"psfw_table_rows_{what}", f"embedding-table rows {what}", labels=labels)
        for what in ("admitted", "expired", "evicted")
    }
    for name, table in sorted(store.tables.tables.items()):
        rows.add_metric([shard, name], table.count)
        touched.add_metric([shard, name], table.rows_touched)
        size.add_metric([shard, name], table.nbytes())
        waiting.add_metric([shard, name], len(table.waiting))
        for what, family in gone.items():
            family.add_metric([shard, name], getattr(table, what))
    yield from (rows, touched, size, waiting, *gone.values())


class ShardMetrics:
    """The metrics of one shard in a registry of its own (several shards may share
    an OS process, as in the embedded default)."""

    def __init__(self, store: ShardStore):
        self.registry = CollectorRegistry()
        labels = ["shard"]
        self.shard = str(store.shard)
        self.bytes_in = Counter("psfw_bytes_received", "tensor bytes received", labels, registry=self.registry)
        self.bytes_out = Counter("psfw_bytes_sent", "tensor bytes sent", labels, registry=self.registry)
        self.refusals = Counter(
            "psfw_refused_requests",
            "requests refused (bad input, unknown slices, waits that ran out), by method and status code",
            ["shard", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "psfw_rpc_seconds",
            "RPC latency by method",
            ["shard", "method"],
            registry=self.registry,
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
        )
        self.registry.register(_StoreCollector(store))
        self._http = None

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Export on http://address:port/metrics (port 0 picks one); returns the port."""
        self._http, _ = start_http_server(port, address, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
