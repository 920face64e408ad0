"""One embedding table's trained rows in a file that a serving side reads without
psfw (``psfw export``, ``psfw.load_table(file)``).

Two formats, the same two arrays:

    FILE.safetensors   ids int64 [n] (sorted), values float32 [n, dim];
                       the header's metadata: table, dim, step, run (as text)
    FILE.npz           ids and values as above, and meta: a 0-d unicode array
                       holding the same metadata as JSON (np.savez: no pickle)

Neither holds optimizer state: only what a lookup needs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from psfw.base.atomic import write_atomic
from psfw.base.errors import UsageError

SUFFIXES = (".safetensors", ".npz")


class TableFile(NamedTuple):
    """What an export file holds: the rows and what they are."""

    ids: np.ndarray  # int64 [n], sorted
    values: np.ndarray  # float32 [n, dim]
    table: str | None  # None: a file without psfw's metadata
    step: int | None
    run: str | None


def is_table_file(path: Path) -> bool:
    """Whether ``path`` names an export file (by its suffix) rather than a run folder."""
    return path.suffix in SUFFIXES and not path.is_dir()


def check_suffix(path: Path, what: str) -> None:
    """UsageError unless ``path`` ends in a suffix of a format this module writes;
    ``what``: how the user gave the path, for the message (``--to``)."""
    if path.suffix not in SUFFIXES:
        raise UsageError(f"{what} {path}: give a file name ending in .safetensors or .npz")


def write_table_file(
    path: Path, ids: np.ndarray, values: np.ndarray, *, table: str, step: int, run: str, what: str = "--to"
) -> None:
    """Write the rows ``ids`` (sorted) and ``values`` of ``table`` at ``step`` of the
    run ``run`` to ``path`` (its suffix picks the format), atomically: a reader sees
    the whole file or none. Raises UsageError when the folder cannot be written."""
    check_suffix(path, what)
    ids = np.ascontiguousarray(ids, np.int64)
    values = np.ascontiguousarray(values, np.float32)
    meta = {"table": table, "dim": int(values.shape[1]), "step": int(step), "run": run}
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, values=values, meta=np.array(json.dumps(meta)))
        data = buffer.getvalue()
    else:
        from safetensors.numpy import save

        data = save({"ids": ids, "values": values}, metadata={k: str(v) for k, v in meta.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as err:
        blocking = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking is not None else err.strerror or str(err)
        raise UsageError(f"{what} {path} cannot be written: {why}") from None


def read_table_file(path: Path) -> TableFile:
    """The rows an export file holds (one psfw wrote, or any with ``ids`` and
    ``values`` of those shapes). Raises UsageError, in one line, for a file that is
    missing, unreadable or not of that form; never unpickles anything."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
                meta = dict(f.metadata() or {})
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except Exception as err:  # numpy, zipfile and safetensors each raise their own kind
        raise UsageError(f"{path} cannot be read as a table: {err}") from None
    ids, values = arrays.get("ids"), arrays.get("values")
    if ids is None or values is None or ids.ndim != 1 or values.ndim != 2 or len(ids) != len(values):
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()) or "nothing"
        raise UsageError(f"{path} is not a table: it should hold ids [n] and values [n, dim], and holds {shapes}")
    return TableFile(
        ids.astype(np.int64, copy=False), values, _text(meta, "table"), _whole(meta, "step"), _text(meta, "run")
    )


def _text(meta: dict[str, Any], key: str) -> str | None:
    return None if meta.get(key) is None else str(meta[key])


def _whole(meta: dict[str, Any], key: str) -> int | None:
    try:
        return int(meta[key])
    except (KeyError, TypeError, ValueError):
        return None
