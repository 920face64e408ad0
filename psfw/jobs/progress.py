"""Step records from the stubs' reports, a progress bar, and the metrics log."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

SUMMED = ("rows",)
MAXED = ("compute_s", "comm_s", "wait_s", "wall_s", "lead")
MINED = ("slowest_step",)


class StepReporter:
    """Combines the reports of a group's worker processes (``processes``: group -> how many
    report here) into one record per step and emits every ``log_every``-th step
    (and the last) to ``sinks``.

    A record holds ``step``, ``loss``, ``accuracy`` (if the model reports it),
    ``samples_per_s`` over the logged window and the time split of the step.
    """

    def __init__(
        self,
        processes: dict[int, int],
        steps: int,
        log_every: int,
        sinks: list[Callable[[dict], None]],
        done: dict[int, int] | None = None,
    ):
        self.processes, self.steps, self.log_every, self.sinks = processes, steps, log_every, sinks
        self.done = {} if done is None else done  # group -> its completed steps, every step
        self.records: list[dict[str, Any]] = []
        self._pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._window: dict[int, tuple[float, int]] = {}  # group -> (window start, rows)

    def __call__(self, report: dict[str, Any]) -> None:
        key = (report["group"], report["step"])
        parts = self._pending.setdefault(key, [])
        parts.append(report)
        if len(parts) < self.processes.get(key[0], 1):
            return
        del self._pending[key]
        group, step = key
        self.done[group] = step + 1
        now = time.perf_counter()
        start, rows = self._window.get(group, (now - max(p["wall_s"] for p in parts), 0))
        # the group's rows when the shards said them (every process of the group, also
        # those that report elsewhere), else the rows of the processes that report here
        rows += parts[0].get("group_rows") or sum(p["rows"] for p in parts)
        if (step + 1) % self.log_every and step + 1 != self.steps:
            self._window[group] = (start, rows)
            return
        self._window[group] = (now, 0)
        total = sum(p["rows"] for p in parts)
        record: dict[str, Any] = {"step": step + 1, "group": group}
        for name in parts[0]:
            if name in ("group", "process", "step", "group_rows") or name in SUMMED:
                continue
            if name in MAXED:
                record[name] = max(p[name] for p in parts)
            elif name in MINED:
                record[name] = min(p[name] for p in parts)
            else:
                record[name] = sum(p[name] * p["rows"] for p in parts) / total
        record["samples_per_s"] = rows / max(now - start, 1e-9)
        self.records.append(record)
        for sink in self.sinks:
            sink(record)


class ProgressBar:
    """A rich progress bar fed with step records."""

    @staticmethod
    def can_show(console: Console | None = None) -> bool:
        """Whether a live bar can be drawn here: an interactive terminal or a
        notebook. Anywhere else (a pipe, a log file) rich would print just the last
        frame, cut to 80 columns; the caller writes plain lines instead."""
        console = Console() if console is None else console
        return console.is_interactive or console.is_jupyter

    def __init__(self, steps: int, console: Console | None = None):
        self._progress = Progress(
            TextColumn("[bold]psfw[/]"),
            BarColumn(bar_width=16),
            # what is not known yet is blank: the first frame shows the step alone
            TextColumn("step {task.completed}/{task.total}{task.fields[spread]}{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task("train", total=steps, spread="", stats="")
        self._steps: dict[int, int] = {}  # group -> last logged step

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, record: dict[str, Any]) -> None:
        self._steps[record.get("group", 0)] = record["step"]
        slowest, fastest = min(self._steps.values()), max(self._steps.values())
        # accuracy only when the model reports it (a regression has none)
        accuracy = f"  acc {record['accuracy']:.3f}" if "accuracy" in record else ""
        stats = (
            f"  loss {record['loss']:.4f}{accuracy}  {record['samples_per_s']:,.0f}/s  [dim]compute "
            f"{record['compute_s'] * 1e3:.1f} / comm {record['comm_s'] * 1e3:.1f} / wait {record['wait_s'] * 1e3:.1f} ms[/]"
        )
        self._progress.update(
            self._task,
            completed=slowest,
            spread=f" ({len(self._steps)} groups, spread {fastest - slowest})" if len(self._steps) > 1 else "",
            stats=stats,
        )


def log_line(record: dict[str, Any]) -> None:
    """A plain progress line, for logs (``psfw worker``, ``psfw launch``, ``psfw
    train`` without a terminal)."""
    acc = f" acc {record['accuracy']:.3f}" if "accuracy" in record else ""
    lead = f" lead {record['lead']}" if "lead" in record else ""
    print(
        f"group {record['group']} step {record['step']} loss {record['loss']:.4f}{acc}{lead} "
        f"{record['samples_per_s']:,.0f} samples/s (compute {record['compute_s'] * 1e3:.1f} / "
        f"comm {record['comm_s'] * 1e3:.1f} / wait {record['wait_s'] * 1e3:.1f} ms)",
        flush=True,
    )
