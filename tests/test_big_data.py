"""A data set larger than any process should hold: 4 GB of inputs in a folder of
``.npy`` files train for a few steps under ``psfw launch`` with 2 worker processes,
and no process's peak resident memory comes near the data's size (a worker reads
only its rows, and maps nothing)."""

import json
import subprocess
import sys

import numpy as np
import pytest

ROWS, FEATURES = 1_000_000, 1024  # float32: 4.1 GB
BLOCK = 16_384  # rows written at a time

# the peak resident memory of the largest process psfw launch started (the shard
# and worker processes are its children, reaped by it): RUSAGE_CHILDREN of a wrapper
MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)
sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(done.returncode)
"""


def write_npy(path, shape, dtype, block_of) -> None:
    """An .npy file written a block of rows at a time: the test never holds it."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        for start in range(0, shape[0], BLOCK):
            f.write(block_of(start, min(BLOCK, shape[0] - start)).tobytes())


@pytest.mark.slow
def test_a_4_gb_npy_folder_trains_with_2_worker_processes_in_little_memory(tmp_path):
    data = tmp_path / "big"
    data.mkdir()
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(BLOCK, FEATURES)).astype(np.float32)
    labels = rng.integers(0, 10, size=ROWS).astype(np.int32)
    try:
        write_npy(data / "x_train.npy", (ROWS, FEATURES), np.float32, lambda s, n: pattern[:n] + np.float32(s % 7))
        np.save(data / "y_train.npy", labels)
        np.save(data / "x_test.npy", pattern[:1000])
        np.save(data / "y_test.npy", labels[:1000])
        size = (data / "x_train.npy").stat().st_size
        (tmp_path / "big.toml").write_text(
            """
[model]
hidden = [16]
[data]
path = "big"
classes = 10
[train]
batch_size = 256
steps = 8
log_every = 4
[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 1
"""
        )
        command = [
            sys.executable,
            "-m",
            "psfw.cli",
            "launch",
            str(tmp_path / "big.toml"),
            "--run-dir",
            str(tmp_path / "run"),
        ]
        done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        peak = int(done.stdout.strip().splitlines()[-1])
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        final = json.loads(lines[-1])
        print(
            f"\n.npy folder of {size / 1e9:.2f} GB ({ROWS:,} rows x {FEATURES} float32), psfw launch with "
            f"2 worker processes, 8 steps of 256 rows: peak RSS of the largest process {peak / 1e6:,.0f} MB "
            f"({peak / size:.1%} of the data); final test loss {final['test_loss']:.3f}"
        )
        assert final["final"] and final["step"] == 8
        assert peak < size / 4, f"a process held {peak / 1e6:.0f} MB of a {size / 1e9:.1f} GB set"
    finally:
        for file in data.glob("*.npy"):
            file.unlink()
