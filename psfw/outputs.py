"""What a run writes to its folder: metrics, net structure, curves, parameters."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from psfw.atomic import write_atomic
from psfw.compute.netgraph import default_layers, net_graph, node_link, render
from psfw.layout import Layout

PARAMS_FILE = "params.safetensors"

log = logging.getLogger("psfw.outputs")


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


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, flushed as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_params(path: Path, params: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    tensors = {n: np.ascontiguousarray(v) for n, v in params.items()}
    write_atomic(path, save(tensors, metadata=metadata))


def read_params(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def write_net(run_dir: Path, layers: list[dict[str, Any]], layout: Layout) -> None:
    """``partition.json``, ``net.json`` and ``net.png``. They come at the very end of
    a run, after its parameters and metrics: a failure here is logged, never raised,
    so that it cannot cost the run its other outputs."""
    partition = layout.to_json()
    write_atomic(run_dir / "partition.json", json.dumps(partition, indent=1).encode())
    try:
        graph = net_graph(layers or default_layers(list(layout.params)), partition)
        write_atomic(run_dir / "net.json", json.dumps(node_link(graph), indent=1).encode())
        render(graph, run_dir / "net.png")
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("the net structure (net.json, net.png) of %s could not be written", run_dir)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics file (a resumed run appends to it)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if not r.get("final")]


def write_curves(path: Path, records: list[dict[str, Any]]) -> None:
    """Loss and accuracy over the steps, one line per group; a failure is logged, as
    in ``write_net``."""
    try:
        _plot_curves(path, records)
    except Exception:  # noqa: BLE001 - the run's other outputs are written already
        log.exception("the curves %s could not be drawn", path)


def _plot_curves(path: Path, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = sorted({r.get("group", 0) for r in records})
    for g in groups:
        rs = [r for r in records if r.get("group", 0) == g]
        label = f"group {g}" if len(groups) > 1 else "train"
        ax_loss.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=label)
        if all("accuracy" in r for r in rs):
            ax_acc.plot([r["step"] for r in rs], [r["accuracy"] for r in rs], label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="training accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
