"""What a run trained: its parameters and its tables' rows, read back from its folder
(or a table from the file ``psfw export`` wrote), and their evaluation
(``psfw.load_params``, ``psfw.load_table``, ``psfw eval``).

A run folder holds the final parameters (``params.safetensors``) and, when it kept
them, consistent checkpoints of every shard (``checkpoints/step-N``); either gives
the parameters by name, and the job's model gives them its pytree form.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from psfw.base.errors import UsageError
from psfw.compute.params import unflatten_params
from psfw.compute.tables import initial_rows
from psfw.jobs.best_step import BEST, read_best
from psfw.jobs.config import Config
from psfw.jobs.evaluation import test_metrics
from psfw.jobs.job import Job, build_job
from psfw.jobs.outputs import CHECKPOINTS, PARAMS_FILE, labels_record
from psfw.jobs.run_settings import stored_config
from psfw.jobs.table_file import is_table_file, read_table_file
from psfw.jobs.user_rows import with_test_split
from psfw.protocol.messages import RowBlock
from psfw.services.checkpoint import complete_steps, load_table_rows, load_values, saved_tables

log = logging.getLogger("psfw")


def run_config(run_dir: Path) -> Config:
    """The config a run trained with (its ``config.json``), its relative paths
    resolving where the run's config file was."""
    path = run_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{run_dir} has no config.json: give the folder of a psfw run") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} cannot be read: {err}") from None
    return stored_config(data, str(path))


def checkpoint_folder(run_dir: Path, checkpoint_dir: str | Path | None = None) -> Path:
    """Where a run's checkpoints are: the run folder's own (``psfw train``, ``psfw
    launch``), or the shards' ``--checkpoint-dir`` of a cluster run."""
    return Path(checkpoint_dir) if checkpoint_dir is not None else run_dir / CHECKPOINTS


Step = int | str | None  # a checkpoint's step, "best" (train.keep_best's), or None: the final parameters


def checkpoint_of(checkpoints: Path, step: int | str) -> tuple[Path, int]:
    """The folder that holds the checkpoint ``step`` names and its step number: a
    numbered one, or the best kept apart (``"best"``); UsageError when none is kept."""
    if step != BEST:
        return checkpoints, int(step)
    record = read_best(checkpoints)
    if record is None:
        raise UsageError(
            f"{checkpoints} keeps no best step: train with train.keep_best to keep the checkpoint of the best evaluation"
        )
    return checkpoints / BEST, int(record["step"])


def trained_values(
    run_dir: Path, job: Job, step: Step = None, checkpoints: Path | None = None
) -> tuple[int, dict[str, np.ndarray]]:
    """``(step, values by name)`` of the run in ``run_dir``: its final parameters, or
    those of its checkpoint of ``step`` (a step, or ``"best"``; in ``checkpoints``,
    default the run's own); UsageError, saying what there is, when the folder has
    neither, and when they are not the parameters of ``job``'s model."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder (give the --run-dir a psfw run wrote)")
    shards = job.config.cluster.servers
    checkpoints = checkpoints or checkpoint_folder(run_dir)
    if step is None:
        path = run_dir / PARAMS_FILE
        if not path.exists():
            steps = complete_steps(checkpoints, shards)
            there = f"; its checkpoints are of steps {_listed(steps)}: give one" if steps else ""
            raise UsageError(f"{run_dir} has no {PARAMS_FILE} (the run did not finish){there}")
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            at = int((f.metadata() or {}).get("step", -1))
            values = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no items())
    else:
        root, at = checkpoint_of(checkpoints, step)
        steps = complete_steps(root, shards)
        if at not in steps:
            there = f"steps {_listed(steps)}" if steps else "none"
            raise UsageError(f"{root} has no complete checkpoint of step {at} for {shards} shards (it has {there})")
        values = _from_checkpoint(root, at, job)
    _check_fit(values, job, run_dir)
    return at, values


def _from_checkpoint(root: Path, step: int, job: Job) -> dict[str, np.ndarray]:
    slices: dict[tuple[str, int], np.ndarray] = {}
    shards = job.config.cluster.servers
    for shard in range(shards):
        slices.update(load_values(root, step, shard, shards))
    values = {}
    for name, param in job.layout.params.items():
        flat = np.empty(int(np.prod(param.shape, dtype=np.int64)), param.dtype)
        for s in param.slices:
            part = slices.get((name, s.index))
            if part is None:
                raise UsageError(f"the checkpoint of step {step} in {root} lacks slice {s.index} of {name}")
            flat[s.start : s.stop] = part.reshape(-1)
        values[name] = flat.reshape(param.shape)
    return values


def _check_fit(values: dict[str, np.ndarray], job: Job, run_dir: Path) -> None:
    want = {n: (tuple(p.shape), str(np.dtype(p.dtype))) for n, p in job.layout.params.items()}
    have = {n: (tuple(v.shape), str(v.dtype)) for n, v in values.items()}
    if want != have:
        wrong = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        shown = ", ".join(f"{n}: {_form(have.get(n))} in the run, {_form(want.get(n))} in the model" for n in wrong[:3])
        raise UsageError(f"{run_dir} holds parameters of another model ({shown}): give the config it trained")


def _form(form: tuple | None) -> str:
    return "absent" if form is None else f"{form[1]}{list(form[0])}"


def _listed(steps: list[int]) -> str:
    return ", ".join(map(str, steps[-8:])) + (" (the newest)" if len(steps) > 8 else "")


def load_params(run_dir: str | Path, step: Step = None, config: Config | None = None) -> Any:
    """The parameters a run trained, as the model's pytree, ready for the model's
    own functions.

    Args:
        run_dir: the run folder (``psfw train --run-dir``, or process 0's of a cluster).
        step: a checkpoint's step instead of the final parameters (``"best"``: the
            best evaluation's, kept by ``train.keep_best``).
        config: the model to read them as (default: the run's own ``config.json``).

    Returns:
        The parameters as the model's ``init`` makes them (a pytree of arrays).

    Raises:
        UsageError: the folder is not a run, lacks what is asked for, or holds
            parameters of another model; the message says what there is.

    Example::

        params = psfw.load_params("runs/run-001")
        loss, metrics = model.loss(params, x, y)
    """
    run_dir = Path(run_dir)
    job = build_job(config if config is not None else run_config(run_dir))
    _, values = trained_values(run_dir, job, step)
    return unflatten_params(job.treedef, list(job.layout.params), values)


def load_table(
    path_or_run_dir: str | Path,
    name: str | None = None,
    step: Step = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of an embedding table: those a run's shards saved in a checkpoint,
    gathered from every shard, or those an export file holds (``psfw export``). A
    row that training never touched is not saved: its value is still its initial one.

    Args:
        path_or_run_dir: the run folder, or a ``.safetensors`` or ``.npz`` file that
            ``psfw export`` wrote.
        name: the table, as the model declares it; for a file, optional (when given,
            it must be the file's table).
        step: the checkpoint's step (default: the newest complete one, also of a
            job whose shards still write checkpoints; ``"best"``: the best
            evaluation's); for a file, optional (when given, it must be the file's).
        checkpoint_dir: the shards' folder of a cluster run (default: the run
            folder's ``checkpoints``); not for a file.

    Returns:
        ``(ids, values)``: the saved rows' ids (int64, sorted) and their values
        ``[len(ids), dim]``.

    Raises:
        UsageError: no such run folder or file; no complete checkpoint of that step;
            no table ``name`` there (the message lists those there are); a file
            that is not a table, or of another table or step.

    Example::

        ids, rows = psfw.load_table("runs/run-001", "user")
        ids, rows = psfw.load_table("runs/run-001/export/user.safetensors")
    """
    path = Path(path_or_run_dir)
    if is_table_file(path):
        return _from_table_file(path, name, step, checkpoint_dir)
    saved = saved_table(path, name, step, checkpoint_dir)
    return saved.ids, saved.values


def _from_table_file(
    path: Path, name: str | None, step: Step, checkpoint_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray]:
    if checkpoint_dir is not None:
        raise UsageError(f"{path} is an export file: checkpoint_dir is for a run folder")
    held = read_table_file(path)
    if name is not None and held.table is not None and name != held.table:
        raise UsageError(f"{path} holds table {held.table!r}, not {name!r}")
    if step is not None and (held.step is None or str(step) != str(held.step)):
        raise UsageError(f"{path} holds the rows of step {held.step}, not of step {step}: export that step")
    return held.ids, held.values


class SavedTable(NamedTuple):
    """One embedding table's rows as a checkpoint saved them, from every shard."""

    step: int
    ids: np.ndarray  # int64 [n], sorted
    values: np.ndarray  # [n, dim]


def saved_table(
    run_dir: Path, name: str | None, step: Step = None, checkpoint_dir: str | Path | None = None
) -> SavedTable:
    """The rows of table ``name`` in the run's checkpoint of ``step`` (None: the
    newest complete one; see ``load_table``).

    A running job's shards go on writing checkpoints and drop older ones. Only
    complete steps are read; when the step being read is removed meanwhile, the
    newest complete one (or the best, which may have moved) is read instead, once;
    a numbered step is not replaced. Raises UsageError, in one line, saying what
    there is."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder (give the --run-dir a psfw run wrote)")
    shards = run_config(run_dir).cluster.servers
    checkpoints = checkpoint_folder(run_dir, checkpoint_dir)
    for last_try in (False, True):
        root, at = _complete_step(checkpoints, step, shards)
        try:
            return _gathered(root, at, shards, name)
        except FileNotFoundError as err:
            if at in complete_steps(root, shards):
                raise UsageError(f"the checkpoint of step {at} in {root} cannot be read: {err}") from None
            if last_try or (step is not None and step != BEST):
                raise UsageError(
                    f"the checkpoint of step {at} in {root} was removed while it was read (a running job's shards "
                    "keep only their newest checkpoints): try again"
                ) from None
            log.info("the checkpoint of step %d in %s was removed while it was read: reading the newest now", at, root)
    raise AssertionError("unreachable")


def _complete_step(checkpoints: Path, step: Step, shards: int) -> tuple[Path, int]:
    """The folder and step of the complete checkpoint ``step`` names (None: the newest)."""
    root, at = checkpoint_of(checkpoints, step) if step is not None else (checkpoints, None)
    steps = complete_steps(root, shards)
    if at is None and not steps:
        raise UsageError(
            f"{root} has no complete checkpoint: the run's tables were never saved there (a running job saves them "
            "first at its first checkpoint; a cluster run's are in its shards' --checkpoint-dir)"
        )
    if at is not None and at not in steps:
        raise UsageError(f"{root} has no complete checkpoint of step {at} (it has {_listed(steps) or 'none'})")
    return root, steps[-1] if at is None else at


def _gathered(root: Path, step: int, shards: int, name: str | None) -> SavedTable:
    """Table ``name``'s rows in every shard's file of checkpoint ``step``, sorted by id."""
    parts = [None if name is None else load_table_rows(root, step, shard, name, shards) for shard in range(shards)]
    if any(p is None for p in parts):
        held = saved_tables(root, step, 0, shards)
        there = f"it holds {', '.join(held)}" if held else "it holds none: the model declares no tables"
        if name is None:
            raise UsageError(f"name the table to read from the checkpoint of step {step} in {root} ({there})")
        raise UsageError(f"the checkpoint of step {step} in {root} holds no embedding table {name!r} ({there})")
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids, kind="stable")
    return SavedTable(step, ids[order], np.concatenate([p[1] for p in parts])[order])


def rows_of(
    job: Job, saved: dict[str, tuple[np.ndarray, np.ndarray]], ids: dict[str, np.ndarray]
) -> dict[str, RowBlock]:
    """The rows of the sorted unique ``ids`` of each table as ``saved`` holds them
    (``load_table``'s ``(ids, values)``), where it holds none what the shards read
    for them: their initial values, or zeros under ``admit_after`` above 1 (an id
    without a row waits for admission)."""
    out = {}
    for name, wanted in ids.items():
        saved_ids, saved_values = saved[name]
        spec = job.model.tables[name]
        if job.config.tables is not None and job.config.tables.lifetime(name).admit_after > 1:
            values = np.zeros((len(wanted), spec.dim), np.float32)
        else:
            values = initial_rows(job.config.seed, name, wanted, spec)
        where = np.searchsorted(saved_ids, wanted).clip(0, max(len(saved_ids) - 1, 0))
        found = saved_ids[where] == wanted if len(saved_ids) else np.zeros(len(wanted), bool)
        values[found] = saved_values[where[found]]
        out[name] = RowBlock(wanted, values)
    return out


def evaluate_run(
    run_dir: str | Path,
    config: Config,
    step: Step = None,
    checkpoint_dir: str | Path | None = None,
    test_file: str | Path | None = None,
) -> dict[str, Any]:
    """The test loss and metrics of what the run in ``run_dir`` trained (its final
    parameters, or its checkpoint of ``step``) under ``config``'s model and test
    split: ``{"step", "test_loss", "test_<metric>"...}`` (``psfw eval``).
    ``checkpoint_dir``: the shards' folder of a cluster run; ``test_file``: an
    ``.npz`` file whose test split is used instead of the config's."""
    job = build_job(config)
    check_labels(Path(run_dir), job)
    if test_file is not None:
        job = with_test_split(job, test_file)
    run_dir = Path(run_dir)
    at, values = trained_values(run_dir, job, step, checkpoint_folder(run_dir, checkpoint_dir))
    test_rows = None
    if job.model.tables:
        saved = {name: load_table(run_dir, name, step or at, checkpoint_dir) for name in job.model.tables}
        test_rows = rows_of(job, saved, job.test_ids())
    loss, metrics = test_metrics(job, values, test_rows)
    return {"step": at, "test_loss": loss, **{f"test_{name}": value for name, value in metrics.items()}}


def check_labels(run_dir: Path, job: Job) -> None:
    """UsageError when the labels (or the targets' scale) of the data now are not
    those the run trained with (its ``labels.json``): every answer would be named
    or scaled wrong."""
    try:
        saved = json.loads((run_dir / "labels.json").read_text())
    except (OSError, ValueError):
        return  # a run of labels that mean themselves, or of an earlier psfw
    now = labels_record(job.data)
    same = saved.keys() == now.keys() and all(
        math.isclose(v, now[k], rel_tol=1e-9) if isinstance(v, float) else v == now[k] for k, v in saved.items()
    )
    if not same:
        raise UsageError(
            f"{run_dir / 'labels.json'} says the run trained with {_shown(saved)}, but the data of "
            f"{job.config.source} gives {_shown(now)} now: predict with the data the run trained on"
        )


def _shown(record: dict[str, Any]) -> str:
    if "labels" in record:
        values = record["labels"]
        return f"the classes {values[:6]}{' ...' if len(values) > 6 else ''}"
    if "target_mean" in record:
        return f"targets of mean {record['target_mean']:.6g} and deviation {record['target_std']:.6g}"
    return "labels that are the classes themselves"
