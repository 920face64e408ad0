"""The run folder's first writes, made once the shards took the job: a command
the shards refuse leaves the folder as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psfw.base.errors import UsageError
from psfw.jobs.config import Config
from psfw.jobs.outputs import mark_run_dir, write_labels
from psfw.jobs.run_dir import EarlierRun


class RunBegins:
    """Writes to the run folder once the shards took the job (at once for shards of
    this OS process, at the first stub's start against running ones), so that a
    refused command leaves the folder as it was: makes ``folder`` for the records; with
    ``chief`` (the OS process that writes the run's outputs), clears what ``earlier``
    left, marks the folder, writes ``config.json`` (what this run trains with),
    ``labels.json`` (what the user's labels are, ``data``'s) and a resume's changes
    in ``history.jsonl``."""

    def __init__(
        self,
        folder: Path | None,
        chief: bool,
        config: Config,
        changes: dict,
        step: int | None,
        earlier: EarlierRun | None,
        data: Any = None,
    ):
        self.folder, self.chief, self.config, self.changes, self.step = folder, chief, config, changes, step
        self.earlier, self.data = earlier, data
        self.done = folder is None

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            if self.earlier is not None:
                self.earlier.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self.chief:
                return
            mark_run_dir(self.folder)
            (self.folder / "config.json").write_text(self.config.model_dump_json(indent=1))
            if self.data is not None:  # what the user's labels are (labels.json)
                write_labels(self.folder, self.data)
            if self.changes:  # config.json holds the settings from now on; the history says since when
                _append_json(self.folder / "history.jsonl", {"resumed_at_step": self.step, "changed": self.changes})
        except OSError as err:
            raise UsageError(f"cannot write the run folder {self.folder}: {err.strerror or err}") from None

    def then(self, on_start: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """A stub's ``on_start``: this first, then ``on_start``."""

        def started(group: int, step: int) -> None:
            self()
            if on_start is not None:
                on_start(group, step)

        return started


def _append_json(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
