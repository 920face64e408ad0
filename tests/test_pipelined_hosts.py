"""The pipelined step between emulated hosts whose links are shaped: two worker hosts
and two shard hosts (network namespaces on one bridge, every link 200 Mbit/s each
way), each shard answering slice by slice; after its steps the job's parameters equal
single-process training's (root only)."""

import json
import subprocess
import time

import numpy as np
import pytest

from psfw.jobs.children import child_env, psfw_command, read_ready
from psfw.jobs.config import parse_config
from psfw.tools import testbed
from psfw.tools.hosts_bench import _toml
from psfw.tools.testbed import check_can_run

from helpers import read_params, reference

STEPS = 6
JOB = {
    "seed": 3,
    "model": {"name": "mlp", "hidden": [32]},
    "data": {"name": "digits"},
    "train": {"batch_size": 64, "steps": STEPS, "log_every": 1, "wait_s": 60},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    # 2 worker processes of one group, their parameters in slices of 2 KiB on each shard
    "cluster": {"workers_per_group": 2, "workers_per_process": 1, "servers": 2, "slice_bytes": 2048},
}


@pytest.fixture
def root():
    why = check_can_run()
    if why is not None:
        pytest.skip(why)


def _start(bed, host: str, argv: list[str]) -> subprocess.Popen:
    """``psfw ARGV`` in ``host``'s namespace, its output read as text."""
    return bed.start(
        host, psfw_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env()
    )


def _ready(path, proc, seconds: float = 120.0) -> str:
    deadline = time.monotonic() + seconds
    while (record := read_ready(path)) is None:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        assert time.monotonic() < deadline, "the shard did not serve in time"
        time.sleep(0.05)
    return record["address"]


# the testbed forks its processes from this one, where JAX may run already: they exec
# psfw at once, so JAX's warning about a fork of a process with threads does not apply
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.slow
def test_pipelined_training_across_shaped_hosts_equals_single_process_training(root, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(_toml(JOB))
    with testbed.Testbed(["w0", "w1", "s0", "s1"]) as bed:
        bed.shape(200 * 10**6)
        addresses, shards = [], []
        for j in range(2):
            ready = tmp_path / f"ready-{j}.json"
            argv = ["server", "--shard", str(j), "--of", "2", "--insecure", "--ready-file", str(ready)]
            argv += ["--listen", f"{bed.address(f's{j}')}:0"]
            proc = _start(bed, f"s{j}", argv)
            shards.append(proc)
            addresses.append(_ready(ready, proc))
        workers = []
        for i in range(2):
            argv = ["worker", str(config), "--process", str(i), "--servers", ",".join(addresses)]
            argv += ["--run-dir", str(tmp_path / "run")] if i == 0 else []
            workers.append(_start(bed, f"w{i}", argv))
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    for proc in shards:  # ended with the testbed
        proc.stdout.close()
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-2000:] for o in outputs)
    assert "link (tcp)" in outputs[0], "between hosts: the shards' links in clear, where Updates are pipelined"
    trained = read_params(tmp_path / "run" / "params.safetensors")
    expected = reference(parse_config(json.loads(json.dumps(JOB))), STEPS)
    for name, value in expected.items():
        np.testing.assert_allclose(trained[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
