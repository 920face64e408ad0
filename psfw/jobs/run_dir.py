"""Whether a run folder may take a run, and clearing what an earlier run left there.

A folder is refused when it holds files psfw did not write; it holds another run's
checkpoints or finished outputs and neither ``--resume`` nor ``--overwrite`` says
what to do with them; or ``--resume`` finds nothing to continue. A folder whose
earlier run stopped before its first checkpoint (and never finished) is reused:
nothing there could be continued. Clearing removes only the files psfw writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from psfw.base.errors import UsageError
from psfw.jobs.outputs import CHECKPOINTS, PARAMS_FILE, RUN_MARKER, run_dir_contents
from psfw.services.checkpoint import complete_steps

log = logging.getLogger("psfw")

# what a run writes at the top of its folder (and the lock file beside its records)
RUN_FILES = (
    RUN_MARKER,
    "config.json",
    "history.jsonl",
    "metrics.jsonl",
    ".metrics.jsonl.lock",
    PARAMS_FILE,
    "partition.json",
    "net.json",
    "net.png",
    "curves.png",
    "labels.json",
    "predictions.npy",  # psfw predict's default output, and a classifier's classes
    "predictions-class.npy",
)
RUN_FILE = re.compile("|".join(re.escape(name) for name in RUN_FILES))
STEP_FOLDER = re.compile(r"step-\d{8}")
# a step's files: its shards' own, and a set re-cut for another number of shards (psfw.jobs.reshard)
CHECKPOINT_FILE = re.compile(r"MANIFEST(-of-\d+)?\.json|shard-\d+(-of-\d+)?\.safetensors")
TEMPORARY = re.compile(r"\.(.+)\.tmp-\d+-\d+")
BEST_ENTRY = re.compile(r"best(-\d{8})?")  # train.keep_best's link and the folders it points to
BEST_RECORD = re.compile(r"BEST\.json")


@dataclass
class EarlierRun:
    """What an earlier run left in ``folder`` that this run clears before it writes:
    ``files`` at the top, checkpoint ``steps`` under ``checkpoints/``."""

    folder: Path
    why: str  # "--overwrite", or why the folder may be reused
    files: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    complete: list[int] = field(default_factory=list)  # the steps of ``steps`` that are whole checkpoints
    best: list[str] = field(default_factory=list)  # train.keep_best's: the link and the folders under checkpoints/

    def describe(self) -> str:
        """``config.json, metrics.jsonl and the checkpoints of steps 40, 45``."""
        parts = list(self.files)
        numbers = [int(s.split("-")[1]) for s in self.steps]
        for kind, group in (
            ("", [n for n in numbers if n in self.complete]),
            ("incomplete ", [n for n in numbers if n not in self.complete]),
        ):
            if group:
                listed = ", ".join(map(str, group))
                parts.append(
                    f"the {kind}checkpoints of steps {listed}"
                    if len(group) > 1
                    else f"the {kind}checkpoint of step {listed}"
                )
        if self.best:
            parts.append("the best step kept")
        return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts) or "nothing"

    def clear(self) -> None:
        """Remove what the earlier run left (never a file psfw did not write), and
        say so in one line."""
        log.warning("%s: removing the earlier run's %s", self.why, self.describe())
        try:
            for name in self.files:
                _remove(self.folder / name)
            root = self.folder / CHECKPOINTS
            for step in self.steps:
                for path in (root / step).iterdir() if (root / step).is_dir() else []:
                    if CHECKPOINT_FILE.fullmatch(path.name) or _temporary(path.name, CHECKPOINT_FILE):
                        _remove(path)
                _rmdir(root / step)  # unless something psfw did not write is left in it
            for name in self.best:  # the link first: a best is never left pointing at nothing
                _remove_best(root / name)
            if self.steps or self.best:
                _rmdir(root)
        except OSError as err:
            raise UsageError(f"cannot remove {err.filename}: {err.strerror or err}") from None


def check_run_dir(run_dir: Path, resume: bool, checkpoints: bool = True, overwrite: bool = False) -> EarlierRun | None:
    """Refuse a run folder that holds files psfw did not write (nothing there is ever
    read), or another run's checkpoints or finished outputs unless told to resume or
    overwrite them (its shards would quietly continue that run, its records would mix
    with this one's); and to resume from one without checkpoints. ``checkpoints``: the
    run's shards keep theirs in the folder (embedded, ``psfw launch``); a ``psfw
    worker``'s do not. Returns what this run clears before it writes (see
    ``EarlierRun``): the earlier run's files with ``overwrite``, or the leftovers of a
    run that stopped before its first checkpoint. Checkpoints of any number of shards
    count: a resume onto another number re-cuts the newest (``psfw.jobs.reshard``)."""
    if resume and overwrite:
        raise UsageError(f"--overwrite starts {run_dir} again and --resume continues it: give one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file: give a folder (a new one, or a run to --resume)")
    ours, entries = run_dir_contents(run_dir)
    if entries and not ours:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"{run_dir} holds files that are not a psfw run ({shown}): use a new or empty --run-dir")
    found = complete_steps(run_dir / CHECKPOINTS) if checkpoints else []
    finished = ours and _finished(run_dir)
    if checkpoints and resume and not found:
        again = (
            "start it again with --overwrite instead of --resume"
            if finished
            else "run without --resume to start it again"
            if ours
            else "check the folder"
        )
        raise UsageError(f"--resume: {run_dir / CHECKPOINTS} holds no complete checkpoint to continue from: {again}")
    if resume or not (ours or found):
        return None
    if (found or finished) and not overwrite:
        what = f"checkpoints (newest: step {found[-1]})" if found else "the outputs of a finished run"
        if found or not checkpoints:
            flags = "pass --resume to continue that run, --overwrite to start it again"
        else:  # nothing to resume from
            what += " and no checkpoint to continue it from"
            flags = "pass --overwrite to start it again"
        raise UsageError(f"{run_dir} holds {what}: {flags}, or use a new --run-dir")
    if found or finished:
        why = f"--overwrite {run_dir}"
    elif checkpoints:
        why = (
            f"reusing {run_dir}: it holds no checkpoint and no finished run (an earlier run stopped before its "
            "first checkpoint)"
        )
    else:  # a worker's: cleared once the shards start this job afresh, so nothing of it goes on
        why = f"reusing {run_dir}: it holds no finished run, and the shards start this job afresh"
    files = [name for name in entries if name in RUN_FILES or _temporary(name, RUN_FILE)]
    # a link psfw did not make is left alone, and nothing it points to is removed
    steps = sorted(
        p.name for p in (run_dir / CHECKPOINTS).glob("step-*") if STEP_FOLDER.fullmatch(p.name) and not p.is_symlink()
    )
    best = sorted(
        (p.name for p in (run_dir / CHECKPOINTS).glob("best*") if BEST_ENTRY.fullmatch(p.name) and _ours(p)), key=len
    )
    return EarlierRun(run_dir, why, files, steps if checkpoints else [], found, best if checkpoints else [])


def resume_hint(command: str, checkpoints: Path, shards: int, every: int = 0, stopped: str = "") -> str:
    """What to tell a user whose run was interrupted: its newest checkpoint and the
    command that continues from it. ``every``: the run's ``train.checkpoint_every``;
    ``stopped``: where it stopped (``step 20``), when known."""
    steps = complete_steps(checkpoints, shards) if checkpoints.exists() else []
    if steps:
        return f"the newest checkpoint is of step {steps[-1]}; continue with: {command}"
    if not every:
        return "no checkpoint was written (set train.checkpoint_every to have them)"
    return f"no checkpoint was reached yet (train.checkpoint_every = {every}{f', stopped at {stopped}' if stopped else ''})"


def _finished(folder: Path) -> bool:
    """Whether the run in ``folder`` finished: its parameters or its final record."""
    if (folder / PARAMS_FILE).exists():
        return True
    try:
        with (folder / "metrics.jsonl").open(errors="replace") as lines:
            return any('"final"' in line and _is_final(line) for line in lines)
    except OSError:
        return False


def _is_final(line: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and bool(record.get("final"))


def _temporary(name: str, of: re.Pattern) -> bool:
    """A temporary file of psfw's atomic write of a file named as ``of`` matches, left
    by a kill (``.NAME.tmp-PID-THREAD``)."""
    found = TEMPORARY.fullmatch(name)
    return found is not None and of.fullmatch(found.group(1)) is not None


def _remove(path: Path) -> None:
    if path.is_file() or path.is_symlink():
        path.unlink(missing_ok=True)


def _ours(path: Path) -> bool:
    """train.keep_best's: the ``best`` link to a ``best-NNNNNNNN`` folder beside it, or
    such a folder itself (never a link into another place)."""
    if path.name == "best":
        return path.is_symlink() and BEST_ENTRY.fullmatch(os.readlink(path) or "") is not None
    return path.is_dir() and not path.is_symlink()


def _remove_best(path: Path) -> None:
    """The ``best`` link, or a ``best-NNNNNNNN`` folder of train.keep_best: its
    checkpoint's files and its record (psfw.jobs.best_step)."""
    if path.is_symlink() or not path.is_dir():
        _remove(path)
        return
    for step in path.glob("step-*"):
        for file in step.iterdir() if STEP_FOLDER.fullmatch(step.name) else []:
            if CHECKPOINT_FILE.fullmatch(file.name) or _temporary(file.name, CHECKPOINT_FILE):
                _remove(file)
        _rmdir(step)
    for file in path.iterdir():
        if file.name == "BEST.json" or _temporary(file.name, BEST_RECORD):
            _remove(file)
    _rmdir(path)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty: it holds files psfw did not write, which stay
        pass
