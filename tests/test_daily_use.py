"""Overrides from the command line, what a run trained read back (load_params, psfw
eval), the run's record of its commands, --version."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import psfw
from psfw.base.errors import ConfigError, UsageError
from psfw.compute.params import flatten_params
from psfw.jobs.config import load_config
from psfw.jobs.embedded import train_async
from psfw.jobs.trained import evaluate_run

from helpers import EXAMPLES, psfw_command

PSFW = [sys.executable, "-m", "psfw.cli"]


def psfw_run(*args):
    done = subprocess.run([*PSFW, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_set_overrides_are_validated_like_the_file_and_recorded(tmp_path):
    run = tmp_path / "run"
    done = psfw_run(
        "train", EXAMPLES / "diabetes.toml", "--set", "train.epochs=2", "--set", "model.hidden=[4, 4]",
        "--set", "optimizer.name=sgd", "--set", "optimizer.learning_rate=1e-2", "--run-dir", run, "--no-progress",
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["model"]["hidden"] == [4, 4]
    assert config["optimizer"]["name"] == "sgd" and config["optimizer"]["learning_rate"] == 0.01
    assert config["overrides"] == [
        "train.epochs=2",
        "model.hidden=[4, 4]",
        "optimizer.name=sgd",
        "optimizer.learning_rate=1e-2",
    ]
    assert "; 22 steps;" in done.stdout.splitlines()[-1]  # 2 epochs of 354 rows in batches of 32
    marker = json.loads((run / "psfw-run.json").read_text())
    assert marker["psfw"] == psfw.__version__
    [entry] = marker["commands"]
    assert entry["command"].startswith(f"psfw train {EXAMPLES / 'diabetes.toml'} --set train.epochs=2 --set")
    assert entry["psfw"] == psfw.__version__


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=many", "diabetes.toml: train.epochs: Input should be a valid integer (got 'many')"),
        ("train.epoch=3", "diabetes.toml: train.epoch: unknown key"),
        ("seed.value=3", "--set seed.value=3: seed is a value, not a table: set seed itself"),
        ("train.epochs", "--set train.epochs: give KEY=VALUE with a dotted key, e.g. --set train.epochs=5"),
        ("source=x.toml", "--set source=x.toml: source: unknown key"),
        ("train.epoch=", "--set train.epoch=: the config sets no train.epoch, so there is nothing to remove"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLES / "diabetes.toml", [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.unit
def test_an_empty_value_removes_the_key_so_another_can_take_its_place():
    """diabetes.toml trains 60 epochs: its steps come from the command line instead."""
    config = load_config(EXAMPLES / "diabetes.toml", ["train.epochs=", "train.steps=30"])
    assert config.train.epochs is None and config.train.steps == 30
    assert config.set_flags() == ["--set", "train.epochs=", "--set", "train.steps=30"]
    with pytest.raises(ConfigError, match="give train.steps or train.epochs, not both"):
        load_config(EXAMPLES / "diabetes.toml", ["train.steps=30"])


@pytest.mark.unit
def test_a_bad_override_stops_the_command_before_anything_is_written(tmp_path, capsys):
    done = psfw_command(
        capsys, "train", EXAMPLES / "diabetes.toml", "--set", "train.epochs=0", "--run-dir", tmp_path / "r"
    )
    assert done.returncode == 2 and not (tmp_path / "r").exists()
    assert done.stderr.strip() == (
        f"psfw: config error: {EXAMPLES / 'diabetes.toml'}: train.epochs: Input should be greater than or equal to 1 "
        "(got 0)"
    )


@pytest.mark.asyncio
async def test_load_params_gives_the_final_or_a_checkpoints_parameters_as_the_models_pytree(tmp_path):
    config = load_config(EXAMPLES / "digits_mlp.toml", ["train.epochs=1", "train.checkpoint_every=10"])
    result = await train_async(config, tmp_path / "run", progress=False)
    assert result.steps == 22
    params = psfw.load_params(tmp_path / "run")
    flat, _ = flatten_params(params)
    assert set(flat) == set(result.params)
    for name, value in result.params.items():
        np.testing.assert_array_equal(np.asarray(flat[name]), value)
    at_end = flatten_params(psfw.load_params(tmp_path / "run", step=22))[0]  # the last checkpoint: the same
    for name, value in result.params.items():
        np.testing.assert_array_equal(np.asarray(at_end[name]), value)
    earlier = flatten_params(psfw.load_params(tmp_path / "run", step=10))[0]
    assert max(float(np.abs(np.asarray(earlier[n]) - result.params[n]).max()) for n in result.params) > 1e-3
    # ready for the model's own functions
    from psfw.jobs.job import build_job

    job = build_job(config)
    loss, metrics = jax.jit(job.model.loss)(params, job.data.x_test, job.data.y_test)
    assert float(loss) == pytest.approx(result.test_loss, rel=1e-5)
    with pytest.raises(
        UsageError, match=r"has no complete checkpoint of step 15 for 2 shards \(it has steps 10, 20, 22\)"
    ):
        psfw.load_params(tmp_path / "run", step=15)


@pytest.mark.asyncio
async def test_psfw_eval_prints_what_the_run_trained_and_refuses_another_model(tmp_path):
    run = tmp_path / "run"
    config = load_config(EXAMPLES / "digits_mlp.toml", ["train.epochs=2", "train.checkpoint_every=20"])
    result = await train_async(config, run, progress=False)
    shown = psfw_run("eval", EXAMPLES / "digits_mlp.toml", "--run-dir", run).stdout.strip()
    assert shown == f"step 44: {result.summary()}"
    figures = json.loads(
        psfw_run("eval", EXAMPLES / "digits_mlp.toml", "--run-dir", run, "--json", "--step", 40).stdout
    )
    assert figures["step"] == 40 and set(figures) == {"step", "test_loss", "test_accuracy"}
    assert figures["test_loss"] != pytest.approx(result.test_loss, rel=1e-6), "step 40's parameters, not the final"
    with pytest.raises(
        UsageError, match=r"holds parameters of another model \(conv0/b: absent in the run, float32\[16\]"
    ):
        evaluate_run(run, load_config(EXAMPLES / "digits_cnn.toml"))
    with pytest.raises(UsageError, match="has no complete checkpoint of step 5 for 2 shards"):
        evaluate_run(run, load_config(EXAMPLES / "digits_mlp.toml"), step=5)


@pytest.mark.unit
def test_version(capsys):
    done = psfw_command(capsys, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"psfw {psfw.__version__}"


@pytest.mark.slow
def test_launch_hands_the_overrides_to_every_process(tmp_path):
    """The same job in every process: a worker without them would be refused by
    the shards (another optimizer), and the run records them."""
    run = tmp_path / "run"
    psfw_run(
        "launch", EXAMPLES / "deploy" / "cluster.toml", "--set", "train.epochs=1", "--set", "optimizer.learning_rate=0.05",
        "--run-dir", run,
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 1 and config["optimizer"]["learning_rate"] == 0.05
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["step"] == 22
