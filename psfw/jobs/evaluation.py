"""Evaluation on the test split: every ``train.eval_every`` steps of group 0 while
training goes on, and once at the end.

The process that runs process 0 evaluates. Its parameter cache tells it of every new
step (``ParamCache.watchers``); at a multiple of ``eval_every`` it hands a copy of
that step's values (they may be buffers that later steps write over) to a thread of
its own, which computes the loss and the metrics over the whole test split in
batches (``evaluate_in_batches``) while the workers train on. Each result is a record ``{"eval": true, "group": 0, "step", "test_loss",
"test_<metric>"...}`` for the metrics file and the log; with ``train.keep_best``,
a ``BestKeeper`` keeps the checkpoint of the best (``psfw.jobs.best_step``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from psfw.compute.clicks import auc
from psfw.compute.params import unflatten_params
from psfw.compute.step import evaluate_in_batches, make_eval_fn, make_sparse_eval_fn
from psfw.jobs.best_step import BestKeeper
from psfw.jobs.job import Job
from psfw.protocol.messages import TableRows
from psfw.runtime.param_cache import StepValues
from psfw.runtime.table_feed import padded_rows, positions
from psfw.runtime.worker_report import StopRequest

log = logging.getLogger("psfw")


def test_metrics(
    job: Job, params: dict[str, Any], test_rows: TableRows | None = None, evaluate: Callable | None = None
) -> tuple[float, dict[str, float]]:
    """The loss and metrics of the parameter values ``params`` (by name) over
    ``job``'s test split, ``train.eval_batch_size`` rows at a time. ``test_rows``:
    for a model with embedding tables, the rows of the test split's ids by table;
    ``evaluate``: the jitted loss (``make_eval_fn``), made here when not given."""
    tree = unflatten_params(job.treedef, list(job.layout.params), params)
    batch = job.config.train.eval_batch_size
    x, y = job.data.x_test, job.data.y_test
    if evaluate is None:
        evaluate = (make_sparse_eval_fn if job.model.tables else make_eval_fn)(job.model.loss)
    loss, metrics = evaluate_in_batches(_looked_up(job, test_rows, evaluate), tree, x, y, batch)
    if job.model.score is not None and _binary(y):
        scored = _scorer(job.model.score, bool(job.model.tables))
        scores = _scores(_looked_up(job, test_rows, scored), tree, x, y, batch)
        metrics["auc"] = auc(np.asarray(y).reshape(-1), scores)
    return loss, metrics


def _looked_up(job: Job, test_rows: TableRows | None, evaluate: Callable) -> Callable:
    """``evaluate(params, x, y)``; for a table model, with the rows of each batch's
    ids looked up in the test split's blocks of rows."""
    if not job.model.tables:
        return evaluate
    if test_rows is None:
        raise ValueError("a model with embedding tables is evaluated with the test split's rows: pass test_rows")
    rows, ids_of = padded_rows(test_rows), job.model.ids
    return lambda params, x, y: evaluate(params, rows, positions(test_rows, ids_of(x)), x, y)


@functools.lru_cache(maxsize=8)
def _scorer(score: Callable, tables: bool) -> Callable:
    """A model's ``score``, jitted in the form of a loss (``(scores, {})``), once."""
    return (make_sparse_eval_fn if tables else make_eval_fn)(lambda params, x, y, *rows: (score(params, x, *rows), {}))


def _binary(labels: Any) -> bool:
    """Whether every test label is 0 or 1 (a click), read a chunk at a time."""
    return all(np.isin(np.asarray(labels[i : i + 65536]), (0, 1)).all() for i in range(0, len(labels), 65536))


def _scores(score: Callable, params: Any, x: Any, y: Any, batch: int) -> np.ndarray:
    """The model's score of every test row, ``batch`` rows at a time."""
    parts = [
        np.asarray(score(params, np.asarray(x[i : i + batch]), np.asarray(y[i : i + batch]))[0])
        for i in range(0, len(x), batch)
    ]
    return np.concatenate([p.reshape(-1) for p in parts])


class Evaluator:
    """Evaluations of ``job`` on its test split; ``sinks`` take each periodic record.
    They run one at a time, in step order; at most ``BACKLOG`` wait (each holds its
    step's parameters), and a step that comes due beyond that is skipped (said once
    in the log): evaluations slower than the training never pile up without bound."""

    BACKLOG = 4

    def __init__(
        self,
        job: Job,
        sinks: list[Callable[[dict[str, Any]], None]],
        keeper: BestKeeper | None = None,
        stop: StopRequest | None = None,
    ):
        self.job, self.sinks, self.keeper, self.stop = job, [*sinks, *([keeper.offer] if keeper else [])], keeper, stop
        self.every = job.config.train.eval_every
        self._evaluate = (make_sparse_eval_fn if job.model.tables else make_eval_fn)(job.model.loss)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="psfw-eval")
        self._lock = threading.Lock()
        self._steps: set[int] = set()  # steps evaluated or on the way
        self._pending: list[tuple[int, Future]] = []
        self._said_skipped = False
        self.records: list[dict[str, Any]] = []

    def evaluate(self, params: dict[str, Any], test_rows: TableRows | None = None) -> tuple[float, dict[str, float]]:
        """Test loss and metrics of the parameter values ``params`` (by name); for a
        model with embedding tables, ``test_rows`` are the test split's rows."""
        return test_metrics(self.job, params, test_rows, self._evaluate)

    def watch(self, step: int, values: StepValues) -> None:
        """A parameter cache's watcher: evaluate ``step`` when it is due (the final
        step is the end's evaluation)."""
        if not self.every or step % self.every or step >= self.job.steps:
            return
        with self._lock:
            if step in self._steps:  # a re-sync went back over it
                return
            self._pending = [(at, future) for at, future in self._pending if not future.done()]
            if len(self._pending) >= self.BACKLOG:
                if not self._said_skipped:
                    self._said_skipped = True
                    log.warning(
                        "the evaluation of step %d is skipped: those of steps %s still wait (evaluations slower "
                        "than train.eval_every steps of training are skipped; raise it to have each)",
                        step,
                        ", ".join(str(at) for at, _ in self._pending),
                    )
                return
            self._steps.add(step)
            if self.keeper is not None:  # its checkpoint, aside before the rotation can drop it
                self.keeper.hold(step)
            # a copy: the values may be a transport's buffers, written over two steps on
            kept = {name: np.array(value) for name, value in values.params.items()}
            self._pending.append((step, self._pool.submit(self._record, step, kept, values.test_rows)))

    def _record(self, step: int, params: dict[str, Any], test_rows: TableRows | None) -> None:
        try:  # a failed evaluation, or a sink that cannot write, must not stop the training
            loss, metrics = self.evaluate(params, test_rows)
            record: dict[str, Any] = {"eval": True, "group": 0, "step": step, "test_loss": loss}
            record.update({f"test_{name}": value for name, value in metrics.items()})
            self.records.append(record)
            for sink in self.sinks:
                sink(record)
            patience = self.job.config.train.stop_after
            if self.stop is not None and self.keeper is not None and self.keeper.since_best >= (patience or 0) > 0:
                best = self.keeper.best or {}
                name = self.keeper.metric.replace("_", " ")
                self.stop.request(
                    f"{name} did not improve for {patience} evaluations (the best: step {best.get('step', '-')})"
                )
        except Exception:  # noqa: BLE001 - see above; the log says what failed
            log.exception("the evaluation of step %d failed", step)

    def exit_callback(self) -> Callable:
        """For an ``AsyncExitStack``: the evaluations on the way finish (in a thread:
        the event loop goes on) when the job ends well, else they are dropped."""

        async def close(kind: Any, error: Any, trace: Any) -> bool:
            await asyncio.to_thread(self.close, kind is None)
            return False

        return close

    def offer_last(self, record: dict[str, Any]) -> None:
        """The final evaluation's record for the best step kept, after the evaluations
        on the way (in their thread, in step order): unless that step was evaluated
        already (an early end on an evaluation's step)."""
        step = int(record["step"])

        def offer() -> None:
            if self.keeper is not None and step not in self._steps:
                self.keeper.hold(step)
                self.keeper.offer(record)

        self._pool.submit(offer).result()

    def close(self, finish: bool = True) -> None:
        """Finish the evaluation on the way (``finish``), or drop it (the job failed)."""
        self._pool.shutdown(wait=finish, cancel_futures=not finish)
        if self.keeper is not None:
            self.keeper.close(finish)


def eval_line(record: dict[str, Any]) -> None:
    """An evaluation's line in the log: ``eval step 100: test loss 0.2311, test accuracy 0.9443``."""
    shown = ", ".join(
        f"{name.replace('_', ' ')} {value:.4f}" for name, value in record.items() if name.startswith("test_")
    )
    print(f"eval step {record['step']}: {shown}", flush=True)
