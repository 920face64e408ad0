"""Models whose every parameter lives in embedding tables (``init`` returns ``{}``)
train, checkpoint, resume and evaluate like any other; a model with no parameter at
all is refused in one line before anything starts."""

import json
import subprocess
import sys

import pytest

import psfw
from psfw.base.errors import ConfigError
from psfw.jobs.config import load_config
from psfw.jobs.job import build_job

from helpers import REPO

PSFW = [sys.executable, "-m", "psfw.cli"]
MF = REPO / "tests" / "models" / "mf_model.py"

CONFIG = f"""
seed = 0

[model]
name = "custom"
path = "{MF}"

[data]
name = "clicks"
users = 300
items = 40
train = 12000
test = 2000

[train]
batch_size = 200
steps = 40
checkpoint_every = 20
eval_every = 20

[tables.optimizer]
name = "adagrad"
learning_rate = 0.3
initial_accumulator_value = 0.0

[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 2
"""


def run(*args, timeout=300):
    return subprocess.run([*PSFW, *args], capture_output=True, text=True, timeout=timeout)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_tables_only_model_trains_checkpoints_resumes_and_evaluates(tmp_path):
    config, out = tmp_path / "mf.toml", tmp_path / "run"
    config.write_text(CONFIG)
    done = run("train", str(config), "--run-dir", str(out), "--no-progress", timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "holds nothing" not in done.stderr, done.stderr
    final = records(out)[-1]
    assert final["final"] and final["step"] == 40
    assert final["test_loss"] < 0.66 and final["test_auc"] > 0.7  # untrained: log 2 = 0.693 and 0.5
    assert psfw.load_params(out) == {}  # no dense parameter: an empty params file, read back
    ids, rows = psfw.load_table(out, "user")
    assert len(ids) > 100 and rows.shape == (len(ids), 9)
    net = json.loads((out / "net.json").read_text())
    assert {"user", "item"} <= {n.get("label") for n in net["nodes"]}
    assert (out / "net.png").read_bytes()[:4] == b"\x89PNG"
    partition = json.loads((out / "partition.json").read_text())
    assert partition["params"] == [] and [t["name"] for t in partition["tables"]] == ["user", "item"]

    more = run("train", str(config), "--run-dir", str(out), "--no-progress", "--set", "train.steps=60", "--resume")
    assert more.returncode == 0, more.stderr
    resumed = records(out)[-1]
    assert resumed["final"] and resumed["step"] == 60 and resumed["test_auc"] > 0.7
    assert (out / "checkpoints" / "step-00000060").is_dir()

    evaluated = run("eval", str(config), "--run-dir", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test_auc"] == pytest.approx(resumed["test_auc"], abs=1e-6)


EMPTY_MODEL = """
import jax.numpy as jnp

def init(key):
    return {}

def loss(params, x, y):
    return jnp.mean(x) * 0.0
"""


@pytest.mark.unit
def test_a_model_without_any_parameter_is_one_config_line_before_anything_starts(tmp_path, capsys):
    from psfw.cli.main import main

    (tmp_path / "empty.py").write_text(EMPTY_MODEL)
    config = tmp_path / "empty.toml"
    config.write_text('[model]\nname = "custom"\npath = "empty.py"\n[data]\nname = "digits"\n[train]\nsteps = 3\n')
    with pytest.raises(ConfigError, match="the model has no parameters"):
        build_job(load_config(config))
    out = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"psfw: config error: {config}: model.path: empty.py: the model has no parameters: init(key) returned no "
        "arrays and it declares no tables; return the parameters to train from init, or declare embedding tables"
    ]
    assert not out.exists()
