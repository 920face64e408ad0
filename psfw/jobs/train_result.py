"""What a training returns (``psfw.train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TrainResult:
    """What ``train`` returns: the final parameters and evaluation, and what the run
    recorded on the way.

    Attributes:
        params: the final values by parameter name (flat: ``"dense0/w"``; empty
            in an OS process that does not run worker process 0).
        steps: the steps trained (fewer than the config's after an early end).
        test_loss: the final evaluation's loss on the test split.
        test_metrics: the final evaluation's metrics (``{"accuracy": ...}``).
        records: the metrics records of the steps, as ``metrics.jsonl`` has them.
        run_dir: the run folder written (None without outputs).
        rpcs: per worker process, the RPCs its stub sent (``{"Put", "Get", "Update"}``).
        shard_addresses: the shards trained against.
        evals: the evaluations during training (``train.eval_every``).
        devices: the job's worker (group x workers_per_group + worker) -> the
            device it computed on, for those run here.
        best: with ``train.keep_best``, the best step kept: ``{"step", "metric",
            "value", "mode"}``.
        stopped: with ``train.stop_after``, why the run ended before its steps.
    """

    params: dict[str, np.ndarray]  # final values by parameter name
    steps: int
    test_loss: float
    test_metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    rpcs: list[dict[str, int]] = field(default_factory=list)  # per process: RPCs its stub sent
    shard_addresses: list[str] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # the evaluations during training (eval_every)
    # worker of the job (group x workers_per_group + worker) -> the device it computed on, for those run here
    devices: dict[int, str] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # train.keep_best: the best step kept, {"step", "metric", "value", "mode"}
    stopped: str | None = None  # train.stop_after: why the run ended before its steps

    @property
    def test_accuracy(self) -> float | None:
        return self.test_metrics.get("accuracy")

    def summary(self) -> str:
        """``test loss 0.1165, test accuracy 0.9694``: the final evaluation, every
        metric the model reports."""
        shown = [f"test loss {self.test_loss:.4f}"]
        shown += [f"test {name.replace('_', ' ')} {value:.4f}" for name, value in self.test_metrics.items()]
        if self.best is not None:
            shown.append(
                f"best step {self.best['step']} ({self.best['metric'].replace('_', ' ')} {self.best['value']:.4f})"
            )
        if self.stopped is not None:
            shown.append(f"stopped early at step {self.steps}: {self.stopped}")
        return ", ".join(shown)
