"""What ``psfw ray`` refuses before it touches a Ray cluster: Ray not installed, an
address where nothing answers, and every config error (the [ray] section's too)."""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

import psfw
from psfw.base.errors import ConfigError, UsageError
from psfw.cli.main import main
from psfw.jobs.config import parse_config

from helpers import free_port

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs Ray: pip install ".[ray]"')


@pytest.mark.unit
@needs_ray
def test_an_address_where_no_ray_cluster_answers_is_said_at_once(tmp_path):
    config = parse_config({"train": {"steps": 1}})
    port = free_port()
    began = time.monotonic()
    with pytest.raises(UsageError, match=rf"no Ray cluster answers at 127.0.0.1:{port} .*ray start --head"):
        psfw.train_on_ray(config, tmp_path / "run", address=f"127.0.0.1:{port}")
    assert time.monotonic() - began < 10
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_without_ray_installed_the_command_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    code = main(["ray", str(tmp_path / "missing.toml")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == 'psfw ray: Ray is not installed: pip install "psfw[ray]"', err


@pytest.mark.unit
@needs_ray
@pytest.mark.parametrize(
    "text, key",
    [
        ('[cluster]\nplacement = "diagonal"\n', "cluster.placement"),
        ("[ray.worker]\nnum_cpus = 0\n", "ray.worker.num_cpus"),
        ("[ray.shard]\nresources = { GPU = 1 }\n", "ray.shard.resources"),
        ("[ray]\nrestarts = -1\n", "ray.restarts"),
    ],
)
def test_config_errors_come_before_any_ray_call(tmp_path, capsys, text, key):
    (tmp_path / "bad.toml").write_text(text)
    code = main(["ray", str(tmp_path / "bad.toml"), "--address", f"127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Ray cluster" not in err, err


@pytest.mark.unit
def test_the_ray_section_reserves_something_for_each_actor():
    with pytest.raises(ConfigError, match="ray.shard.num_cpus: 0 with no GPU"):
        parse_config({"ray": {"shard": {"num_cpus": 0}}})
    bundle = parse_config({"ray": {"worker": {"num_cpus": 0, "resources": {"fast_net": 1}}}}).ray.worker.bundle()
    assert bundle == {"fast_net": 1.0}
