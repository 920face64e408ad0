"""Consistent shard checkpoints on disk.

Layout under a checkpoint folder shared by the shards of a job:

    step-00000040/shard-0.safetensors   one file per shard, written atomically
    step-00000040/shard-1.safetensors
    step-00000040/MANIFEST.json         written once every shard's file is there

A step counts as a checkpoint only when its manifest exists and names files that
are all present with the recorded sizes; a half-written set is never loaded. Files
are safetensors (tensors plus a JSON header): no pickle anywhere.

A checkpoint is a state, not a shard layout: the jobs layer re-cuts one for another
number of shards (``psfw.jobs.reshard``) into a set of its own beside the one the
shards wrote, in the same step folder, its files named by the count:

    step-00000040/shard-0-of-3.safetensors
    step-00000040/MANIFEST-of-3.json    {"step", "shards": 3, "files", "resharded_from": 2}

A shard of 3 then loads that set as it loads its own (``saved_file``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from psfw.base.atomic import write_atomic

MANIFEST = "MANIFEST.json"
RESHARDED_MANIFEST = re.compile(r"MANIFEST-of-(\d+)\.json")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def shard_file(root: Path, step: int, shard: int) -> Path:
    """The file shard ``shard`` writes for ``step``."""
    return step_dir(root, step) / f"shard-{shard}.safetensors"


def resharded_file(root: Path, step: int, shard: int, shards: int) -> Path:
    """The file of shard ``shard`` in a set re-cut for ``shards`` shards."""
    return step_dir(root, step) / f"shard-{shard}-of-{shards}.safetensors"


def resharded_manifest(root: Path, step: int, shards: int) -> Path:
    return step_dir(root, step) / f"MANIFEST-of-{shards}.json"


def saved_file(root: Path, step: int, shard: int, shards: int | None = None) -> Path:
    """The file shard ``shard`` of ``shards`` loads for ``step``: the one a re-cut
    wrote for that count where there is one, else the one the shards wrote
    (``shards`` None: that one)."""
    if shards is not None and resharded_manifest(root, step, shards).exists():
        return resharded_file(root, step, shard, shards)
    return shard_file(root, step, shard)


def save_shard(root: Path, step: int, shard: int, shards: int, tensors: dict[str, np.ndarray], meta: dict) -> bool:
    """Write one shard's state for ``step``; complete the manifest if this was the
    last shard of the set. Returns whether the step is now a complete checkpoint."""
    from safetensors.numpy import save

    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"psfw": json.dumps(meta)})
    write_atomic(shard_file(root, step, shard), data)
    return complete(root, step, shards)


def save_resharded(
    root: Path, step: int, states: list[tuple[dict[str, np.ndarray], dict]], resharded_from: int
) -> None:
    """Write a set re-cut for ``len(states)`` shards at ``step``: every shard's file,
    then its manifest, which makes it a checkpoint (a crash before leaves files no
    manifest names, which nothing loads and the next re-cut writes over)."""
    from safetensors.numpy import save

    shards = len(states)
    files = {}
    for shard, (tensors, meta) in enumerate(states):
        path = resharded_file(root, step, shard, shards)
        data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"psfw": json.dumps(meta)})
        write_atomic(path, data)
        files[path.name] = len(data)
    manifest = {"step": step, "shards": shards, "files": files, "resharded_from": resharded_from}
    write_atomic(resharded_manifest(root, step, shards), json.dumps(manifest, indent=1).encode())


def complete(root: Path, step: int, shards: int) -> bool:
    """Write the manifest of ``step`` if every shard's file exists."""
    files = [shard_file(root, step, i) for i in range(shards)]
    if not all(f.exists() for f in files):
        return False
    manifest = {"step": step, "shards": shards, "files": {f.name: f.stat().st_size for f in files}}
    write_atomic(step_dir(root, step) / MANIFEST, json.dumps(manifest, indent=1).encode())
    return True


class CheckpointSet(NamedTuple):
    """One manifest of a step folder: the set of files of one shard count."""

    step: int
    shards: int
    folder: Path
    files: dict[str, int]  # name -> size
    resharded_from: int  # the shard count it was re-cut from (0: its shards wrote it)

    def missing(self) -> list[str]:
        """The files the manifest names that are absent or of another size."""
        out = []
        for name, size in self.files.items():
            try:
                if (self.folder / name).stat().st_size != size:
                    out.append(name)
            except OSError:
                out.append(name)
        return out


def _names(folder: Path) -> list[str]:
    """The names in ``folder``; none when it is absent or went away while listed (a
    running job's shards drop old checkpoints while a reader lists them)."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def checkpoint_sets(root: Path) -> list[CheckpointSet]:
    """Every readable manifest under ``root``, complete or not, oldest step first
    (at one step: the shards' own set first, then the re-cut ones by count)."""
    sets = []
    for folder in sorted(root / name for name in _names(root) if name.startswith("step-")):
        found = sorted(
            (folder / n for n in _names(folder) if n == MANIFEST or RESHARDED_MANIFEST.fullmatch(n)),
            key=lambda p: (p.name != MANIFEST, len(p.name), p.name),
        )
        for path in found:
            try:
                manifest = json.loads(path.read_text())
                sets.append(
                    CheckpointSet(
                        int(manifest["step"]),
                        int(manifest["shards"]),
                        folder,
                        {str(k): int(v) for k, v in manifest["files"].items()},
                        int(manifest.get("resharded_from", 0)),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
    return sets


def complete_steps(root: Path, shards: int | None = None) -> list[int]:
    """Steps with a complete checkpoint (manifest and every file it names) for
    ``shards`` shards (None: for any count), oldest first."""
    return sorted({s.step for s in checkpoint_sets(root) if (shards is None or s.shards == shards) and not s.missing()})


def complete_counts(root: Path, step: int) -> list[int]:
    """The shard counts that ``step`` has a complete checkpoint for, the shards' own first."""
    return [s.shards for s in checkpoint_sets(root) if s.step == step and not s.missing()]


def load_shard(
    root: Path, step: int, shard: int, shards: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and metadata of shard ``shard`` (of ``shards``) for ``step``."""
    from safetensors import safe_open

    with safe_open(str(saved_file(root, step, shard, shards)), framework="numpy") as f:
        meta = json.loads(f.metadata()["psfw"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    return tensors, meta


def prune(root: Path, keep: int, shards: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older folders."""
    done = complete_steps(root, shards)
    if len(done) <= keep:
        return
    oldest_kept = done[-keep]
    for folder in root.glob("step-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if step < oldest_kept:
            shutil.rmtree(folder, ignore_errors=True)


def drop_after(root: Path, step: int) -> None:
    """Remove the checkpoint folders of steps after ``step`` (a rolled-back history),
    so that a half-written set from it can never be completed and loaded later."""
    for folder in root.glob("step-*") if root.is_dir() else []:
        try:
            later = int(folder.name.split("-", 1)[1]) > step
        except ValueError:
            continue
        if later:
            shutil.rmtree(folder, ignore_errors=True)


class CheckpointFolder:
    """A job's checkpoint folder as a shard uses it: the functions above, bound to
    ``root``. A shard is handed one (``ShardStore(checkpoints=...)``), so a test can
    hand it a folder that, say, waits inside a write."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def save(self, step: int, shard: int, shards: int, tensors: dict[str, np.ndarray], meta: dict) -> bool:
        return save_shard(self.root, step, shard, shards, tensors, meta)

    def load(self, step: int, shard: int, shards: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return load_shard(self.root, step, shard, shards)

    def steps(self, shards: int | None) -> list[int]:
        return complete_steps(self.root, shards)

    def counts(self, step: int) -> list[int]:
        return complete_counts(self.root, step)

    def prune(self, keep: int, shards: int) -> None:
        prune(self.root, keep, shards)

    def drop_after(self, step: int) -> None:
        drop_after(self.root, step)


def load_values(root: Path, step: int, shard: int, shards: int | None = None) -> dict[tuple[str, int], np.ndarray]:
    """Only the parameter values of shard ``shard`` (of ``shards``) for ``step``, by
    (parameter, slice) (the optimizer state is not read)."""
    from safetensors import safe_open

    with safe_open(str(saved_file(root, step, shard, shards)), framework="numpy") as f:
        meta = json.loads(f.metadata()["psfw"])
        return {(e["key"], int(e["slice"])): f.get_tensor(f"value/{i}") for i, e in enumerate(meta["slices"])}


def load_table_rows(
    root: Path, step: int, shard: int, table: str, shards: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The ids and values of the rows of ``table`` of shard ``shard`` (of ``shards``)
    for ``step`` (None when its checkpoint holds no such table)."""
    from safetensors import safe_open

    with safe_open(str(saved_file(root, step, shard, shards)), framework="numpy") as f:
        names = set(f.keys())
        if f"table/{table}/ids" not in names:
            return None
        return f.get_tensor(f"table/{table}/ids"), f.get_tensor(f"table/{table}/values")


def saved_tables(root: Path, step: int, shard: int, shards: int | None = None) -> list[str]:
    """The names of the embedding tables of shard ``shard`` (of ``shards``) for ``step``, sorted."""
    from safetensors import safe_open

    with safe_open(str(saved_file(root, step, shard, shards)), framework="numpy") as f:
        keys = [k.split("/") for k in f.keys()]  # noqa: SIM118 (safe_open has no items())
    return sorted(parts[1] for parts in keys if len(parts) == 3 and parts[0] == "table" and parts[2] == "ids")
