"""The best step, kept apart from the rotation of checkpoints (``train.keep_best``).

The shards keep the newest checkpoints of a run and drop older ones; the best
evaluation is usually among the dropped. The process that evaluates (process 0)
hands each evaluation's record to a ``BestKeeper``: when the kept metric improved, the
checkpoint of that step (evaluations fall on checkpoints) is linked into

    checkpoints/best/step-00000300/...   the shards' files and manifest, as written
    checkpoints/best/BEST.json           {"step", "metric", "value", "mode"}

(``best`` links to a folder ``best-00000300`` that holds them), which the rotation
never touches. ``--step best`` (psfw eval, predict, generate) and
``load_model(run, step="best")`` read it like any checkpoint. A resumed run goes on
from the best its folder already holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from psfw.base.atomic import write_atomic
from psfw.services.checkpoint import complete_steps, step_dir

__all__ = ["BEST", "BestKeeper", "best_mode", "evaluations_since_best", "read_best"]

BEST = "best"  # the folder beside the numbered checkpoints, and the --step that names it
RECORD = "BEST.json"
log = logging.getLogger("psfw")


def best_mode(metric: str, mode: str | None) -> str:
    """``mode`` as given, else ``min`` for a loss and ``max`` for anything else."""
    return mode or ("min" if metric.endswith("loss") else "max")


def read_best(checkpoints: Path) -> dict[str, Any] | None:
    """The record of the best step kept under ``checkpoints`` (None: none kept)."""
    try:
        return json.loads((checkpoints / BEST / RECORD).read_text())
    except (OSError, ValueError):
        return None


def evaluations_since_best(run_dir: Path, checkpoints: Path, restored: int | None) -> int:
    """How many evaluations a resumed run made after its best, before the step it
    resumes from (``train.stop_after`` counts on from there; the resumed step itself
    is evaluated again)."""
    best = read_best(checkpoints)
    if best is None or restored is None:
        return 0
    steps = set()
    try:
        with (run_dir / "metrics.jsonl").open() as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("eval") and best["step"] < record.get("step", -1) < restored:
                    steps.add(record["step"])
    except OSError:
        return 0
    return len(steps)


class BestKeeper:
    """Keeps the checkpoint of the best evaluation of ``metric`` (``mode``: max or
    min) under ``checkpoints`` (see the module docstring); ``shards``: the job's.

    ``hold(step)``, when an evaluation of ``step`` is due, links that step's
    checkpoint aside as soon as the shards complete it (within ``wait_s``), before
    the rotation can drop it while the evaluation runs; ``offer(record)`` then keeps
    it as the best, or lets it go."""

    def __init__(
        self, checkpoints: Path, shards: int, metric: str, mode: str, wait_s: float = 60.0, since_best: int = 0
    ):
        self.root, self.shards, self.metric, self.mode, self.wait_s = checkpoints, shards, metric, mode, wait_s
        self.best = read_best(checkpoints)
        if self.best is not None and self.best.get("metric") != metric:
            log.warning(
                "train.keep_best: the best step kept in %s is by %s, this run keeps the best by %s: it starts anew",
                checkpoints,
                self.best.get("metric"),
                metric,
            )
            self.best = None
        # evaluations since the best one (a resumed run's: those it already made)
        self.since_best = since_best if self.best is not None else 0
        self._held: dict[int, Future] = {}
        self._lock = threading.Lock()  # one offer at a time: the evaluations' and the final one
        self._closing = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="psfw-best")
        self.off = False  # a best's checkpoint could not be kept: no best is kept from then on
        current = self._current()
        for left in checkpoints.glob(f"{BEST}-*"):  # of a run that stopped between a hold and its offer
            if left.name != current:
                shutil.rmtree(left, ignore_errors=True)

    def hold(self, step: int) -> None:
        """Link the checkpoint of ``step`` aside once it is complete (in a thread)."""
        if step > 0 and not self.off and step not in self._held:
            self._held[step] = self._pool.submit(self._link_aside, step)

    def offer(self, record: dict[str, Any]) -> None:
        """An evaluation's record (``{"step", "test_loss", ...}``): keep its step's
        checkpoint when its metric is the best yet."""
        with self._lock:
            self._offer(record)

    def _offer(self, record: dict[str, Any]) -> None:
        step, value = int(record["step"]), record.get(self.metric)
        if step == 0 or self.off:  # step 0's are the initial values: nothing trained, no checkpoint
            return
        held = self._held.pop(step, None)
        if self.best is not None and step == self.best["step"]:  # the best evaluated again (a resume): as it was
            return
        folder = held.result() if held is not None else self._link_aside(step)
        if value is None or not math.isfinite(value) or (self.best and not self._better(value, self.best["value"])):
            self.since_best += 1
            if folder is not None and folder.name != self._current():
                shutil.rmtree(folder, ignore_errors=True)
            return
        if folder is None:  # a best that cannot be kept: a later, worse one must not pass for it
            self.off, self.best = True, None
            log.warning(
                "train.keep_best: no complete checkpoint of step %d appeared in %s within %.0f s (do the shards "
                "checkpoint elsewhere?): the best step is not kept",
                step,
                self.root,
                self.wait_s,
            )
            return
        self.best = {"step": step, "metric": self.metric, "value": value, "mode": self.mode}
        self.since_best = 0
        write_atomic(folder / RECORD, json.dumps(self.best, indent=1).encode())
        before = self._current()
        link = self.root / f"{BEST}.link-{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(folder.name, link)
        os.replace(link, self.root / BEST)  # the switch: one rename
        if before and before != folder.name:
            shutil.rmtree(self.root / before, ignore_errors=True)

    def close(self, finish: bool = True) -> None:
        """Finish the links on the way (``finish``), or drop them (a stop)."""
        self._closing = not finish
        self._pool.shutdown(wait=finish, cancel_futures=not finish)

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def _current(self) -> str | None:
        try:
            return os.readlink(self.root / BEST)
        except OSError:
            return None

    def _link_aside(self, step: int) -> Path | None:
        """Hard links to the files of the checkpoint of ``step`` in a folder of their
        own (they are written once, by rename, and never changed: the rotation's
        removal leaves the links whole); None when it is not complete in time."""
        deadline = time.monotonic() + (0 if self.off else self.wait_s)
        while step not in complete_steps(self.root, self.shards):
            if self._closing or time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        folder = self.root / f"{BEST}-{step:08d}"
        if folder.name == self._current():  # the kept best itself (evaluated again): never rebuilt
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        source, target = step_dir(self.root, step), step_dir(folder, step)
        target.mkdir(parents=True)
        try:
            for file in source.iterdir():
                try:
                    os.link(file, target / file.name)
                except OSError:  # a file system without hard links
                    shutil.copy2(file, target / file.name)
        except FileNotFoundError:
            pass
        if step not in complete_steps(folder, self.shards):  # dropped by the rotation meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return folder
