"""What a run writes to its folder: metrics, net structure, curves, parameters."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from psfw.base.atomic import write_atomic
from psfw.base.errors import UsageError
from psfw.compute.netgraph import default_layers, net_graph, node_link, render
from psfw.compute.tables import rows_by_shard
from psfw.protocol.layout import Layout

PARAMS_FILE = "params.safetensors"
RUN_MARKER = "psfw-run.json"  # marks a folder as a psfw run: nothing else in a folder is read
CHECKPOINTS = "checkpoints"

log = logging.getLogger(__name__)


def new_run_dir(root: str | Path = "runs") -> Path:
    """A fresh folder under ``root``: ``runs/run-001``, ``runs/run-002``, ..."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 100000):
        candidate = root / f"run-{i:03d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder under {root}: clean it up")


def mark_run_dir(folder: Path) -> None:
    """Mark ``folder`` as a psfw run, and record the command that writes it now with
    its psfw version and start time: ``{"psfw": first version, "commands": [...]}``
    (a resume adds its own)."""
    from psfw.version import __version__

    marker = folder / RUN_MARKER
    try:
        record = json.loads(marker.read_text()) if marker.exists() else {}
    except ValueError:  # cut short by a kill: start it again
        record = {}
    if not isinstance(record, dict):
        record = {}
    record.setdefault("psfw", __version__)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    record.setdefault("commands", []).append({"command": command_line(), "psfw": __version__, "started": started})
    write_atomic(marker, json.dumps(record, indent=1).encode())


def command_line(argv: list[str] | None = None) -> str:
    """The command this OS process runs, as a shell would take it: ``psfw train
    job.toml --set train.epochs=5`` (a Python program that calls psfw: its own argv)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name == "psfw" or argv[0].endswith(("psfw/cli/__main__.py", "psfw/cli/main.py"))):
        argv[0] = "psfw"
    return shlex.join(argv)


def run_dir_contents(folder: Path) -> tuple[bool, list[str]]:
    """Whether ``folder`` is a psfw run, and the names of what it holds (its
    checkpoints folder aside: shards may make it before the run starts)."""
    if not folder.exists():
        return False, []
    entries = sorted(p.name for p in folder.iterdir() if p.name != CHECKPOINTS)
    return RUN_MARKER in entries or _earlier_run(folder), entries


def _earlier_run(folder: Path) -> bool:
    """A run folder of a psfw from before the marker: its config.json is a psfw config."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "data", "train", "optimizer", "cluster"} <= set(config)


# what a resumed run may change: how long and how it trains on, not what it trains
RESUMABLE = ("train.", "cluster.")


def resumed_config_changes(folder: Path, config: Any, change_optimizer: bool = False) -> dict[str, list]:
    """The settings ``config`` changes against the config of the run in ``folder``
    that it resumes (``field: [before, after]``); UsageError for a change of the
    model, the data, the seed or the name, which cannot continue that run's
    parameters, and of the optimizer unless ``change_optimizer``."""
    from psfw.base.errors import ConfigError
    from psfw.base.identity import changed
    from psfw.jobs.config import parse_config
    from psfw.jobs.run_settings import settings_of, stored_settings

    path = folder / "config.json"
    if not path.exists():
        return {}
    before = stored_settings(json.loads(path.read_text()))
    try:  # with the keys added since filled in with their defaults, as the new config has them
        before = settings_of(parse_config(before, str(path)))
    except ConfigError:  # settings psfw no longer takes: compared as written
        pass
    after = settings_of(config)
    changes = changed(before, after)
    resumable = RESUMABLE + (("optimizer.",) if change_optimizer else ())
    fixed = [f"{k}: {b} -> {a}" for k, (b, a) in changes.items() if not k.startswith(resumable)]
    if fixed:
        shown = "; ".join(fixed[:4]) + (f"; {len(fixed) - 4} more" if len(fixed) > 4 else "")
        only_optimizer = all(k.startswith("optimizer.") for k in changes if not k.startswith(RESUMABLE))
        hint = " (or pass --change-optimizer to go on with the new optimizer settings)" if only_optimizer else ""
        raise UsageError(
            f"--resume: the config changes what {folder} trained ({shown}): resume with that run's settings "
            f"({path}){hint}, or start a new --run-dir"
        )
    return changes


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as it comes.

    Several OS processes of one machine may write one file (``psfw launch``: the
    first worker process of each group writes its group's records): each write
    takes an exclusive lock (a lock file beside it) and appends whole lines. Resuming, ``begin`` drops
    the abandoned history of a group once its stub knows where the group resumes:
    its records past that step, the old final record (where group 0 resumes: its
    first process writes it; another group restarted alone leaves it), the records
    of groups the job no longer has (``groups``) and lines a kill cut short, so every
    step appears once."""

    def __init__(self, path: Path, resume: bool = False, groups: int | None = None):
        self.path = path
        self.resume, self.groups = resume, groups
        self._lock = path.with_name(f".{path.name}.lock")

    def begin(self, group: int, step: int) -> None:
        """``group`` goes on after ``step`` completed steps (see the class)."""
        if not self.resume:
            return
        with self._locked():
            if not self.path.exists():
                return
            kept = [r for r in _lines(self.path) if not self._abandoned(r, group, step)]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _abandoned(self, record: dict[str, Any], group: int, step: int) -> bool:
        if record.get("final"):  # group 0's process 0 writes it: another group's restart leaves it
            return group == 0
        of, at = record.get("group", 0), record.get("step", 0)
        # the evaluation of the step it resumes from is made again
        return (self.groups is not None and of >= self.groups) or (
            of == group and (at > step or (at == step and record.get("eval")))
        )

    def write(self, record: dict[str, Any]) -> None:
        with self._locked(), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @contextlib.contextmanager
    def _locked(self):
        with self._lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield


def _lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics file; a line a kill cut short is dropped."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_params(path: Path, params: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    tensors = {n: np.ascontiguousarray(v) for n, v in params.items()}
    write_atomic(path, save(tensors, metadata=metadata))


def write_net(
    run_dir: Path, layers: list[dict[str, Any]], layout: Layout, tables: dict[str, Any] | None = None
) -> None:
    """``partition.json``, ``net.json`` and ``net.png``. They come at the very end of
    a run, after its parameters and metrics: a failure here is logged, never raised,
    so that it cannot cost the run its other outputs. ``tables``: the model's
    embedding tables as the shards took them (each spread over every shard by id)."""
    partition = layout.to_json()
    if tables:
        shards = layout.shards
        partition["tables"] = [
            {
                "name": name,
                **entry,
                "owner_worker": 0,
                "shards": "all, by id (route in psfw.compute.tables)",
                # the rows each shard holds (null: an unbounded table, or too large to count here)
                "shard_rows": rows_by_shard(name, entry["rows"], shards) if entry["rows"] is not None else None,
            }
            for name, entry in tables.items()
        ]
    write_atomic(run_dir / "partition.json", json.dumps(partition, indent=1).encode())
    try:
        graph = net_graph(layers or default_layers(list(layout.params)), partition)
        write_atomic(run_dir / "net.json", json.dumps(node_link(graph), indent=1).encode())
        render(graph, run_dir / "net.png")
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("the net structure (net.json, net.png) of %s could not be written", run_dir)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The step and evaluation records (``"eval": true``) of a run's metrics file (a
    resumed run appends to it). A line that is not one of those (the last line of a
    run killed while writing it) is skipped with a warning."""
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not record.get("final"):
            records.append(record)
        elif not (isinstance(record, dict) and record.get("final")):
            bad += 1
    if bad:
        log.warning("%s: skipped %d lines that are not step records", path, bad)
    return records


def write_curves(path: Path, records: list[dict[str, Any]]) -> None:
    """Training loss over the steps, one line per group, and the test loss of the
    evaluations beside it; the same for accuracy when the model reports it. A failure
    is logged, as in ``write_net``."""
    try:
        _plot_curves(path, records)
    except Exception:  # noqa: BLE001 - the run's other outputs are written already
        log.exception("the curves %s could not be drawn", path)


def _plot_curves(path: Path, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    # accuracy only when the model reports it: a regression's curves are its loss alone
    accuracy = any("accuracy" in r for r in steps) or any("test_accuracy" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(10 if accuracy else 5.5, 3.6), squeeze=False)
    ax_loss, ax_acc = axes[0][0], axes[0][1] if accuracy else None
    groups = sorted({r.get("group", 0) for r in steps})
    for g in groups:
        rs = [r for r in steps if r.get("group", 0) == g]
        label = f"train, group {g}" if len(groups) > 1 else "train"
        ax_loss.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=label)
        if ax_acc is not None and all("accuracy" in r for r in rs):
            ax_acc.plot([r["step"] for r in rs], [r["accuracy"] for r in rs], label=label)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test")
        if ax_acc is not None and all("test_accuracy" in r for r in evals):
            ax_acc.plot([r["step"] for r in evals], [r["test_accuracy"] for r in evals], "o-", label="test")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    if ax_acc is not None:
        ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def labels_record(data: Any) -> dict[str, Any]:
    """What a class index or a standardized target means in the user's data
    (``{"labels": [...]}``, ``{"target_mean": ..., "target_std": ...}``; empty when
    they mean themselves)."""
    record: dict[str, Any] = {}
    if data.labels is not None:
        record["labels"] = list(data.labels)
    if data.target_scale is not None:
        record["target_mean"], record["target_std"] = data.target_scale
    return record


def write_labels(folder: Path, data: Any) -> None:
    """``labels.json`` (``labels_record``), for whoever uses the model without psfw,
    and for psfw to check that it predicts with the same meaning."""
    record = labels_record(data)
    if record:
        (folder / "labels.json").write_text(json.dumps(record, indent=1))
