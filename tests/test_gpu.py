"""On a machine with GPUs (skipped elsewhere): the workers compute on them, the
digits MLP and the transformer train, and the benchmark says it ran there."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async

GPUS = [d for d in jax.local_devices() if d.platform == "gpu"]
pytestmark = pytest.mark.skipif(not GPUS, reason="no GPU on this machine")


def cluster(workers: int) -> dict:
    return {"workers_per_group": workers, "workers_per_process": workers, "servers": 2}


@pytest.mark.asyncio
async def test_the_digits_mlp_trains_with_its_workers_on_gpus():
    workers = max(2, len(GPUS))
    config = parse_config(
        {
            "model": {"hidden": [128]},
            "data": {"name": "digits"},
            "train": {"batch_size": 64, "epochs": 10, "log_every": 50},
            "optimizer": {"name": "adam", "learning_rate": 0.002},
            "cluster": cluster(workers),
        }
    )
    result = await train_async(config, progress=False, outputs=False)
    assert set(result.devices.values()) <= {f"gpu:{d.id}" for d in GPUS}
    if len(GPUS) > 1:
        assert len(set(result.devices.values())) == min(workers, len(GPUS)), "one GPU per worker"
    assert result.test_accuracy > 0.93


@pytest.mark.asyncio
async def test_the_transformer_trains_on_gpus(tmp_path):
    config = parse_config(
        {
            "model": {"name": "transformer", "width": 128, "heads": 4, "depth": 2},
            "data": {"name": "stdlib_text", "seq_len": 128},
            "train": {"batch_size": 64, "steps": 300, "log_every": 50, "eval_every": 150},
            "optimizer": {"name": "adam", "learning_rate": 0.002},
            "cluster": cluster(max(2, len(GPUS))),
        }
    )
    result = await train_async(config, tmp_path / "run", progress=False)
    assert all(device.startswith("gpu:") for device in result.devices.values())
    before, after = result.evals[0]["test_bits_per_token"], result.test_metrics["bits_per_token"]
    print(f"\nbits per byte on the test files: {before:.3f} before, {after:.3f} after 300 steps")
    assert np.isfinite(after) and after < before - 3


def test_the_benchmark_reports_the_gpu():
    done = subprocess.run(
        [sys.executable, "-m", "psfw.cli", "bench", "--json", "--steps", "20", "--warmup", "3", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nbench on {figures['devices']}: {json.dumps(figures)}")
    assert any(device.startswith("gpu:") for device in figures["devices"])
    assert figures["embedded"] > 0 and figures["single_process"] > 0
