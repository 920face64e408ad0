"""``psfw export``: one embedding table's trained rows, gathered from every shard of
a complete checkpoint, written to a file a serving side reads without psfw (the
format: ``psfw.jobs.table_file``)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from psfw.jobs.table_file import check_suffix, write_table_file
from psfw.jobs.trained import Step, saved_table

EXPORT = "export"  # the run folder's folder of exported tables


class ExportedTable(NamedTuple):
    """What ``export_table`` wrote."""

    path: Path
    table: str
    rows: int
    dim: int
    step: int

    def summary(self) -> str:
        return f"table {self.table}, {self.rows} rows of {self.dim} from step {self.step} -> {self.path}"


def export_table(
    run_dir: str | Path,
    table: str,
    to: str | Path | None = None,
    step: Step = None,
    checkpoint_dir: str | Path | None = None,
) -> ExportedTable:
    """Write the rows of ``table`` (ids and values, no optimizer state) that the
    run's checkpoint of ``step`` holds to ``to``.

    Args:
        run_dir: the run folder (a cluster run's: process 0's ``--run-dir``).
        table: the table, as the model declares it.
        to: a ``.safetensors`` or ``.npz`` file (default:
            ``RUN_DIR/export/TABLE.safetensors``), written atomically.
        step: the checkpoint's step, or ``"best"`` (default: the newest complete
            one: a finished run's final checkpoint, or a running job's newest).
        checkpoint_dir: the shards' ``--checkpoint-dir`` of a cluster run (default:
            the run folder's ``checkpoints``).

    Returns:
        An ``ExportedTable``: the file, the table, its rows and width, the step.

    Raises:
        UsageError: an unknown suffix, no such run folder, no complete checkpoint of
            that step, no such table, a folder that cannot be written; one line each.
    """
    run_dir = Path(run_dir)
    path = Path(to) if to is not None else run_dir / EXPORT / f"{table}.safetensors"
    check_suffix(path, "--to")  # before anything is read
    saved = saved_table(run_dir, table, step, checkpoint_dir)
    write_table_file(path, saved.ids, saved.values, table=table, step=saved.step, run=str(run_dir.resolve()))
    return ExportedTable(path, table, len(saved.ids), int(saved.values.shape[1]), saved.step)
