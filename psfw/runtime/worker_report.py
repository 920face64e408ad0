"""What a worker hands its stub each step, and the early end of a job that the
stubs learn from the shards."""

from __future__ import annotations

import threading
from typing import Any


class WorkerReport:
    """One worker's report for one step: the gradients of the dense parameters by
    name, and those of its process's table rows by table (None without tables)."""

    __slots__ = ("worker", "step", "generation", "grads", "rows", "metrics", "row_grads")

    def __init__(self, worker, step, generation, grads, rows, metrics, row_grads=None):
        self.worker, self.step, self.generation = worker, step, generation
        self.grads, self.rows, self.metrics, self.row_grads = grads, rows, metrics, row_grads


TIMES = ("compute_s", "wait_s")  # a worker's timings: not metrics of the model


def step_metrics(
    batch: list[WorkerReport], group_metrics: tuple[dict[str, float], int], comm_s: float, wall_s: float
) -> dict[str, Any]:
    """A step's report from its workers' (``batch``): the rows, the group's metrics
    (``group_metrics``: summed x rows by the shards, and the group's rows), else this
    process's own, and the step's times: compute, communication, waiting, wall."""
    rows = sum(c.rows for c in batch)
    report: dict[str, Any] = {"rows": rows}
    metrics, group_rows = group_metrics
    if group_rows:  # the whole group's, over all its processes (the shards added them up)
        report["group_rows"] = group_rows
        report.update({k: v / group_rows for k, v in metrics.items()})
    else:  # shards that do not add metrics up: this process's own
        for key in batch[0].metrics:
            if key not in TIMES:
                report[key] = sum(float(c.metrics[key]) * c.rows for c in batch) / rows
    compute_s = max(c.metrics["compute_s"] for c in batch)
    report.update(compute_s=compute_s, comm_s=comm_s, wait_s=max(0.0, wall_s - compute_s - comm_s), wall_s=wall_s)
    return report


class StopRequest:
    """An early end of a job asked for by the worker process that evaluates
    (``train.stop_after``): its stub names, in its next Update, the step the job ends
    at; the shards answer every process with it, so that all of them stop at that
    same step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._at = 0

    def request(self, reason: str) -> None:
        """Ask for the end (from any thread); the first reason stands."""
        with self._lock:
            self.reason = self.reason or reason

    def at(self, step: int) -> int:
        """The step count the job ends at, fixed by the first Update (of ``step``)
        sent after the request: ``step + 1``; 0 while none was asked for."""
        with self._lock:
            if self.reason is not None and not self._at:
                self._at = step + 1
            return self._at
