"""Consistent shard checkpoints on disk.

Layout under a checkpoint folder shared by the shards of a job:

    step-00000040/shard-0.safetensors   one file per shard, written atomically
    step-00000040/shard-1.safetensors
    step-00000040/MANIFEST.json         written once every shard's file is there

A step counts as a checkpoint only when its manifest exists and names files that
are all present with the recorded sizes; a half-written set is never loaded. Files
are safetensors (tensors plus a JSON header): no pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from psfw.base.atomic import write_atomic

MANIFEST = "MANIFEST.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def shard_file(root: Path, step: int, shard: int) -> Path:
    return step_dir(root, step) / f"shard-{shard}.safetensors"


def save_shard(root: Path, step: int, shard: int, shards: int, tensors: dict[str, np.ndarray], meta: dict) -> bool:
    """Write one shard's state for ``step``; complete the manifest if this was the
    last shard of the set. Returns whether the step is now a complete checkpoint."""
    from safetensors.numpy import save

    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"psfw": json.dumps(meta)})
    write_atomic(shard_file(root, step, shard), data)
    return complete(root, step, shards)


def complete(root: Path, step: int, shards: int) -> bool:
    """Write the manifest of ``step`` if every shard's file exists."""
    files = [shard_file(root, step, i) for i in range(shards)]
    if not all(f.exists() for f in files):
        return False
    manifest = {"step": step, "shards": shards, "files": {f.name: f.stat().st_size for f in files}}
    write_atomic(step_dir(root, step) / MANIFEST, json.dumps(manifest, indent=1).encode())
    return True


def complete_steps(root: Path, shards: int | None = None) -> list[int]:
    """Steps with a complete checkpoint (manifest and every file it names), oldest first."""
    steps = []
    for folder in sorted(root.glob("step-*")) if root.is_dir() else []:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = manifest["files"]
            ok = all((folder / name).stat().st_size == size for name, size in files.items())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ok and (shards is None or manifest["shards"] == shards):
            steps.append(int(manifest["step"]))
    return steps


def load_shard(root: Path, step: int, shard: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and metadata one shard saved for ``step``."""
    from safetensors import safe_open

    with safe_open(str(shard_file(root, step, shard)), framework="numpy") as f:
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

    def load(self, step: int, shard: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return load_shard(self.root, step, shard)

    def steps(self, shards: int) -> list[int]:
        return complete_steps(self.root, shards)

    def prune(self, keep: int, shards: int) -> None:
        prune(self.root, keep, shards)

    def drop_after(self, step: int) -> None:
        drop_after(self.root, step)


def load_values(root: Path, step: int, shard: int) -> dict[tuple[str, int], np.ndarray]:
    """Only the parameter values one shard saved for ``step``, by (parameter, slice)
    (the optimizer state is not read)."""
    from safetensors import safe_open

    with safe_open(str(shard_file(root, step, shard)), framework="numpy") as f:
        meta = json.loads(f.metadata()["psfw"])
        return {(e["key"], int(e["slice"])): f.get_tensor(f"value/{i}") for i, e in enumerate(meta["slices"])}


def load_table_rows(root: Path, step: int, shard: int, table: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The ids and values of the rows of ``table`` one shard saved for ``step``
    (None when its checkpoint holds no such table)."""
    from safetensors import safe_open

    with safe_open(str(shard_file(root, step, shard)), framework="numpy") as f:
        names = set(f.keys())
        if f"table/{table}/ids" not in names:
            return None
        return f.get_tensor(f"table/{table}/ids"), f.get_tensor(f"table/{table}/values")


def saved_tables(root: Path, step: int, shard: int) -> list[str]:
    """The names of the embedding tables one shard saved for ``step``, sorted."""
    from safetensors import safe_open

    with safe_open(str(shard_file(root, step, shard)), framework="numpy") as f:
        keys = [k.split("/") for k in f.keys()]  # noqa: SIM118 (safe_open has no items())
    return sorted(parts[1] for parts in keys if len(parts) == 3 and parts[0] == "table" and parts[2] == "ids")
