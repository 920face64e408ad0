"""Devices: the workers of a process compute on their own (two forced host devices,
in a process of their own), and a device the process does not see is refused before
a run folder is made."""

import json
import os
import subprocess
import sys

import pytest

from psfw.base.errors import ConfigError
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async

from helpers import REPO, psfw_command

FORCED_DEVICES = """
import asyncio, json, logging, sys
import jax
from psfw.jobs.config import load_config, parse_config
from psfw.jobs.embedded import train_async
sys.path.insert(0, {tests!r})
from helpers import reference

assert len(jax.local_devices()) == 2, jax.local_devices()
logging.basicConfig(level=logging.INFO)
out = {{}}
for devices, per_process in (("auto", 2), ([1, 1], 2), ("auto", 1)):
    config = parse_config({{
        "seed": 1, "model": {{"hidden": [16]}}, "data": {{"name": "digits"}},
        "train": {{"batch_size": 40, "steps": 4, "log_every": 1}},
        "optimizer": {{"name": "adam", "learning_rate": 0.01}},
        "cluster": {{"workers_per_group": 2, "workers_per_process": per_process, "servers": 2, "devices": devices}},
    }})
    result = asyncio.run(train_async(config, progress=False, outputs=False))
    expected = reference(config, 4)
    error = max(float(abs(result.params[n] - expected[n]).max()) for n in expected)
    out[f"{{json.dumps(devices)}} {{per_process}}"] = {{"devices": result.devices, "error": error}}
print(json.dumps(out))
"""


def test_the_workers_of_a_process_compute_on_their_own_devices():
    """Two forced host devices: the two workers' gradients come from different
    devices (read from the arrays), and the result is still plain training's."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", FORCED_DEVICES.format(tests=str(REPO / "tests"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out['"auto" 2']["devices"] == {"0": "cpu:0", "1": "cpu:1"}
    assert out["[1, 1] 2"]["devices"] == {"0": "cpu:1", "1": "cpu:1"}
    assert out['"auto" 1']["devices"] == {"0": "cpu:0", "1": "cpu:1"}, "two processes here spread too"
    for case in out.values():
        assert case["error"] < 1e-5
    assert "worker 0 on cpu:0, worker 1 on cpu:1" in done.stderr


@pytest.mark.unit
def test_a_device_the_process_does_not_see_is_refused():
    config = parse_config({"train": {"steps": 1}, "cluster": {"devices": [0, 7]}}, "job.toml")
    import asyncio

    with pytest.raises(ConfigError, match=r"^job.toml: cluster.devices: device 7 does not exist: this process sees 1"):
        asyncio.run(train_async(config, progress=False, outputs=False))


@pytest.mark.unit
def test_a_device_the_process_does_not_see_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "job.toml").write_text("[train]\nsteps = 1\n[cluster]\ndevices = [3]\n")
    done = psfw_command(capsys, "train", tmp_path / "job.toml", "--run-dir", tmp_path / "run")
    assert done.returncode == 2 and "cluster.devices: device 3 does not exist" in done.stderr
    assert not (tmp_path / "run").exists()
