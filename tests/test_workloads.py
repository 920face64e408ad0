"""Users' own data (.npz, memory-mapped .npy folders, load() modules), the shipped
regression and text sets, the transformer, batched evaluation during training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from psfw.base.errors import ConfigError
from psfw.compute.datasets import Rows
from psfw.compute.step import evaluate_in_batches, make_eval_fn
from psfw.compute.user_data import NpyFile
from psfw.jobs.config import load_config, parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job
from psfw.jobs.outputs import read_records

from helpers import REPO, assert_params_close, psfw_command, reference


def regression_arrays(rows=300, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, 2)) + 0.1 * rng.normal(size=(rows, 2))).astype(np.float32)
    return x, y


def config_of(data: dict, tmp_path, steps=5, model=None, **train) -> dict:
    return {
        "seed": 2,
        "model": model or {"name": "mlp", "hidden": [16]},
        "data": data,
        "train": {"batch_size": 30, "steps": steps, "log_every": 1, **train},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2},
    }


@pytest.mark.asyncio
async def test_a_memory_mapped_npy_folder_trains_like_single_process_training(tmp_path):
    """Float targets of two values per row (regression), read from memory-mapped
    files: the test split is a view of rows, and the result equals plain training."""
    x, y = regression_arrays()
    (tmp_path / "set").mkdir()
    np.save(tmp_path / "set" / "x_train.npy", x)
    np.save(tmp_path / "set" / "y_train.npy", y)
    config = parse_config(config_of({"path": "set", "test_fraction": 0.1}, tmp_path), "job.toml", str(tmp_path))
    job = build_job(config)
    assert isinstance(job.data.x_train, Rows) and isinstance(job.data.x_train.base, NpyFile)
    assert len(job.data.x_train) == 270 and len(job.data.x_test) == 30 and job.data.classes is None
    assert not set(job.data.x_train.index) & set(job.data.x_test.index)
    result = await train_async(config, progress=False, outputs=False)
    assert_params_close(result.params, reference(config, 5))
    assert set(result.test_metrics) == set(), "a regression reports its loss alone: no accuracy"
    assert all("accuracy" not in r for r in result.records)


@pytest.mark.asyncio
async def test_an_npz_file_with_its_own_test_split_and_integer_classes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)).astype(np.float64)
    y = (x[:, 0] > 0).astype(np.uint8) + 2 * (x[:, 1] > 0)
    y = y.reshape(-1, 1)  # a column of labels: one per row
    np.savez(tmp_path / "d.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    config = parse_config(config_of({"path": "d.npz", "classes": 4}, tmp_path, steps=40), "job.toml", str(tmp_path))
    result = await train_async(config, progress=False, outputs=False)
    assert result.test_accuracy > 0.6  # 4 quadrants: a chance guess is 0.25
    assert len(build_job(config).data.x_test) == 40


@pytest.mark.asyncio
async def test_a_load_module_gets_its_options_and_trains(tmp_path):
    (tmp_path / "my_data.py").write_text(
        "import numpy as np\n"
        "def load(rows, seed=0):\n"
        "    rng = np.random.default_rng(seed)\n"
        "    x = rng.normal(size=(rows, 3)).astype(np.float32)\n"
        "    return {'x_train': x, 'y_train': x.sum(axis=1)}\n"
    )
    data = {"module": "my_data.py", "options": {"rows": 120, "seed": 4}, "test_fraction": 0.25}
    config = parse_config(config_of(data, tmp_path, steps=3), "job.toml", str(tmp_path))
    job = build_job(config)
    assert len(job.data.x_train) == 90 and len(job.data.x_test) == 30
    result = await train_async(config, progress=False, outputs=False)
    assert_params_close(result.params, reference(config, 3))


BAD_DATA = {
    "missing file": ({"path": "nowhere.npz"}, {}, "data.path: {tmp}/nowhere.npz does not exist"),
    "missing array": ({"path": "d.npz"}, {"x_train": "x"}, "d.npz has no array y_train (it holds x_train)"),
    "rows differ": ({"path": "d.npz"}, {"x_train": "x", "y_train": "y[:-1]"}, "x_train has 100 rows but y_train 99"),
    "label out of range": (
        {"path": "d.npz", "classes": 3},
        {"x_train": "x", "y_train": "c"},
        "y_train holds values from 0 to 4, out of range for classes = 3",
    ),
    "float labels with classes": (
        {"path": "d.npz", "classes": 3},
        {"x_train": "x", "y_train": "y"},
        "classes = 3 needs integer class labels, but y_train is float32",
    ),
    "integer labels without classes": (
        {"path": "d.npz"},
        {"x_train": "x", "y_train": "c"},
        "data.classes: the labels are integers (int64) but no classes are given",
    ),
    "test without labels": (
        {"path": "d.npz"},
        {"x_train": "x", "y_train": "y", "x_test": "x"},
        "has x_test but no y_test",
    ),
    "object arrays": ({"path": "d.npz"}, {"x_train": "o", "y_train": "y"}, "psfw never unpickles"),
    "smaller than a batch": (
        {"path": "d.npz"},
        {"x_train": "x[:20]", "y_train": "y[:20]"},
        "train.batch_size: 30 is larger than the 16 training rows of data.path d.npz",
    ),
    "load raises": ({"module": "m.py"}, "raise OSError('no such table')", "load(**{}) of {tmp}/m.py failed: OSError"),
    "load returns a list": ({"module": "m.py"}, "return [1, 2]", "load() of {tmp}/m.py returned list"),
    "load returns lists": (
        {"module": "m.py"},
        "return {'x_train': [1.0], 'y_train': [1.0]}",
        "x_train is a list, not a numpy array",
    ),
}


def write_bad_case(case: str, tmp_path) -> None:
    data, arrays, _ = BAD_DATA[case]
    rng = np.random.default_rng(0)
    values = {
        "x": rng.normal(size=(100, 4)).astype(np.float32),
        "y": rng.normal(size=100).astype(np.float32),
        "c": np.arange(100) % 5,
        "o": np.array([{"a": 1}] * 100, dtype=object),
    }
    if isinstance(arrays, str):
        (tmp_path / "m.py").write_text(f"def load():\n    {arrays}\n")
    elif arrays:
        np.savez(tmp_path / "d.npz", **{k: eval(v, {}, values) for k, v in arrays.items()})  # noqa: S307
    (tmp_path / "job.toml").write_text(_toml(config_of(data, tmp_path)))


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_naming_the_file_and_the_field(case, tmp_path):
    write_bad_case(case, tmp_path)
    with pytest.raises(ConfigError) as err:
        build_job(load_config(tmp_path / "job.toml"))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'job.toml'}: ") and "\n" not in message
    assert BAD_DATA[case][2].replace("{tmp}", str(tmp_path)) in message


def test_psfw_train_refuses_bad_data_in_one_line_before_anything_is_written(tmp_path, capsys):
    write_bad_case("label out of range", tmp_path)
    run = tmp_path / "run"
    done = psfw_command(capsys, "train", tmp_path / "job.toml", "--run-dir", run)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"psfw: config error: {tmp_path / 'job.toml'}: data.path: {tmp_path / 'd.npz'}: ")
    assert not run.exists(), "a refused job writes nothing"


def _toml(config: dict) -> str:
    def value(v):
        return (
            json.dumps(v)
            if not isinstance(v, dict)
            else "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        )

    out = [f"seed = {config['seed']}"]
    for section in ("model", "data", "train", "optimizer", "cluster"):
        out.append(f"[{section}]")
        out += [f"{k} = {value(v)}" for k, v in config[section].items()]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(
    ("data", "model", "expected"),
    [
        ({"name": "digits", "seq_len": 32}, {}, "data.seq_len: applies to stdlib_text data only, not to digits"),
        ({"name": "digits", "classes": 3}, {}, "data.classes: applies to synthetic, path and module data only"),
        ({"name": "digits", "path": "d.npz"}, {}, "data.path: give data.name (a shipped set) or data.path, not both"),
        ({"path": "a.npz", "module": "m.py"}, {}, "data.module: give data.path or data.module, not both"),
        ({}, {"name": "mlp", "width": 64}, "model.width: applies to transformer models only, not to mlp"),
        ({}, {"name": "transformer", "width": 30, "heads": 4}, "model.width: 30 must be a multiple of model.heads"),
    ],
)
def test_config_keys_of_another_source_or_model_are_refused(data, model, expected):
    with pytest.raises(ConfigError, match="^job.toml: ") as err:
        parse_config({"data": data, "model": model}, "job.toml")
    assert expected in str(err.value)


def test_models_that_cannot_take_the_data_say_why():
    text = {"name": "stdlib_text", "seq_len": 16}
    with pytest.raises(ConfigError, match="model.name: mlp gives one class per row, but the labels have the shape"):
        build_job(parse_config({"data": text, "train": {"steps": 1}}, "job.toml"))
    with pytest.raises(ConfigError, match="model.name: transformer needs token sequences"):
        build_job(parse_config({"data": {"name": "diabetes"}, "model": {"name": "transformer"}}, "job.toml"))


def test_evaluation_in_batches_is_the_mean_over_all_rows():
    config = parse_config({"data": {"name": "digits"}, "model": {"hidden": [8]}, "train": {"steps": 1}})
    job = build_job(config)
    import jax

    params = job.model.init(jax.random.PRNGKey(0))
    evaluate = make_eval_fn(job.model.loss)
    whole_loss, whole = evaluate(params, job.data.x_test, job.data.y_test)
    loss, metrics = evaluate_in_batches(evaluate, params, job.data.x_test, job.data.y_test, 50)  # 359 = 7 x 50 + 9
    assert loss == pytest.approx(float(whole_loss), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float(whole["accuracy"]), rel=1e-5)


def test_an_evaluation_reads_the_values_of_its_step_when_their_buffers_are_written_over_meanwhile():
    """A transport may publish views of buffers that a later step writes over
    (psfw.runtime.step_region): the evaluation keeps a copy of its step's values."""
    import threading

    import jax

    from psfw.compute.params import flatten_params
    from psfw.jobs.evaluation import Evaluator

    config = parse_config(
        {"data": {"name": "digits"}, "model": {"hidden": [8]}, "train": {"steps": 9, "eval_every": 3}}
    )
    job = build_job(config)
    flat, _ = flatten_params(job.model.init(jax.random.PRNGKey(0)))
    buffers = {name: np.array(value) for name, value in flat.items()}
    expected = Evaluator(job, []).evaluate(dict(buffers))
    evaluator = Evaluator(job, [])
    busy = threading.Event()
    evaluator._pool.submit(busy.wait, 30)  # the evaluation thread is busy: step 3 waits its turn
    evaluator.watch(3, buffers)
    for value in buffers.values():
        value[...] = 0.0  # the transport writes the step after next into the same buffers
    busy.set()
    evaluator.close()
    record = evaluator.records[0]
    assert record["step"] == 3 and record["test_loss"] == pytest.approx(expected[0], rel=1e-6)


def test_shipped_sets_diabetes_and_the_standard_library_text():
    diabetes = build_job(parse_config({"data": {"name": "diabetes"}, "train": {"steps": 1}})).data
    assert diabetes.classes is None and diabetes.x_train.shape == (354, 10) and diabetes.y_test.shape == (88,)
    assert abs(float(diabetes.y_train.mean())) < 1e-5, "targets are standardized by the training split"
    text = build_job(
        parse_config({"data": {"name": "stdlib_text", "seq_len": 32}, "model": {"name": "transformer", "width": 16}})
    ).data
    assert text.classes == 256 and text.x_train.shape[1:] == (32,) and text.y_train.shape == text.x_train.shape
    np.testing.assert_array_equal(text.x_train[0, 1:], text.y_train[0, :-1])  # labels: the next bytes
    assert len(text.x_train) * 32 > 2_000_000 and len(text.x_test) * 32 > 200_000


@pytest.mark.asyncio
async def test_the_transformer_learns_the_standard_library_text_and_is_evaluated_while_it_trains(tmp_path):
    config = parse_config(
        {
            "model": {"name": "transformer", "width": 32, "heads": 2, "depth": 1},
            "data": {"name": "stdlib_text", "seq_len": 32},
            "train": {"batch_size": 16, "steps": 60, "log_every": 10, "eval_every": 20, "eval_batch_size": 512},
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2},
        }
    )
    result = await train_async(config, tmp_path / "run", progress=False)
    evals = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals == result.evals
    assert 7.5 < evals[0]["test_bits_per_token"] < 8.5, "a fresh model guesses among 256 bytes"
    assert result.test_metrics["bits_per_token"] < evals[0]["test_bits_per_token"] - 2.0
    assert result.test_metrics["bits_per_token"] == pytest.approx(result.test_loss / np.log(2))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


@pytest.mark.asyncio
async def test_the_transformer_in_psfw_equals_single_process_training():
    """Sequence labels (a label per position) travel the same scheme."""
    config = parse_config(
        {
            "seed": 5,
            "model": {"name": "transformer", "width": 16, "heads": 2, "depth": 1, "ff": 2},
            "data": {"name": "stdlib_text", "seq_len": 8},
            "train": {"batch_size": 12, "steps": 3, "log_every": 1},
            "optimizer": {"name": "sgd", "learning_rate": 0.5},
            "cluster": {"workers_per_group": 3, "workers_per_process": 3, "servers": 2, "slice_bytes": 1024},
        }
    )
    result = await train_async(config, progress=False, outputs=False)
    assert_params_close(result.params, reference(config, 3))


@pytest.mark.asyncio
async def test_a_resumed_run_evaluates_each_step_once(tmp_path):
    base = {
        "data": {"name": "diabetes"},
        "model": {"hidden": [8]},
        "train": {"batch_size": 32, "steps": 12, "log_every": 2, "eval_every": 4, "checkpoint_every": 4},
        "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 1},
    }
    await train_async(parse_config(base), tmp_path / "run", progress=False)
    longer = {**base, "train": {**base["train"], "steps": 20}}
    result = await train_async(parse_config(longer), tmp_path / "run", progress=False, resume=True)
    evals = [r["step"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if r.get("eval")]
    assert evals == [0, 4, 8, 12, 16]
    assert [r["step"] for r in result.evals] == [12, 16]


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


def test_a_device_the_process_does_not_see_is_refused():
    config = parse_config({"train": {"steps": 1}, "cluster": {"devices": [0, 7]}}, "job.toml")
    import asyncio

    with pytest.raises(ConfigError, match=r"^job.toml: cluster.devices: device 7 does not exist: this process sees 1"):
        asyncio.run(train_async(config, progress=False, outputs=False))


@pytest.mark.asyncio
async def test_a_users_model_may_return_any_metrics_and_each_is_recorded_and_evaluated(tmp_path):
    (tmp_path / "reg.py").write_text(
        "import jax, jax.numpy as jnp\n"
        "def init(key):\n"
        "    return {'w': jax.random.normal(key, (10,)) * 0.1, 'b': jnp.zeros(())}\n"
        "def loss(params, x, y):\n"
        "    error = x @ params['w'] + params['b'] - y\n"
        "    return jnp.mean(error ** 2), {'mae': jnp.mean(jnp.abs(error)), 'worst': jnp.max(jnp.abs(error))}\n"
    )
    config = parse_config(
        {
            "model": {"name": "custom", "path": "reg.py"},
            "data": {"name": "diabetes"},
            "train": {"batch_size": 32, "steps": 20, "log_every": 5, "eval_every": 10},
            "optimizer": {"name": "sgd", "learning_rate": 0.05},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 1},
        },
        "job.toml",
        str(tmp_path),
    )
    result = await train_async(config, tmp_path / "run", progress=False)
    assert set(result.test_metrics) == {"mae", "worst"}
    assert all({"mae", "worst"} <= set(r) and "accuracy" not in r for r in result.records)
    assert [sorted(r) for r in result.evals] == [["eval", "group", "step", "test_loss", "test_mae", "test_worst"]] * 2
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["test_mae"] == pytest.approx(result.test_metrics["mae"]) and "test_accuracy" not in final
    assert result.test_loss < result.evals[0]["test_loss"]


def test_an_npy_file_reads_the_rows_numpy_would(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(50, 3, 2)).astype(">f4")  # the other byte order: read in this machine's
    np.save(tmp_path / "a.npy", values)
    f = NpyFile(tmp_path / "a.npy")
    assert f.dtype == np.dtype("float32") and f.shape == (50, 3, 2) and len(f) == 50
    for rows in ([4, 5, 6, 1, 1, 49, 0], np.array([7, -1, 8], np.int32), slice(3, 20, 4), slice(-5, None), -50, 49):
        np.testing.assert_array_equal(f[rows], values[rows].astype("float32"), err_msg=str(rows))
    assert f[np.array([], np.int64)].shape == (0, 3, 2) and f[5:5].shape == (0, 3, 2)
    for wrong in (50, -51, [0, 50], np.array([True, False]), np.array([1.0]), np.zeros((2, 2), int)):
        with pytest.raises(IndexError):
            f[wrong]
    with pytest.raises(TypeError, match="holds an open file"):
        import copy

        copy.copy(f)
    f.close()


@pytest.mark.asyncio
async def test_a_run_on_a_users_files_resumes(tmp_path):
    """Its config.json has no data.name, and the classes it set are its own."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=(x[:, 0] > 0).astype(np.int32))
    settings = config_of({"path": "d.npz", "classes": 2}, tmp_path, steps=4, checkpoint_every=2)
    await train_async(parse_config(settings, "job.toml", str(tmp_path)), tmp_path / "run", progress=False)
    settings["train"]["steps"] = 6
    result = await train_async(
        parse_config(settings, "job.toml", str(tmp_path)), tmp_path / "run", progress=False, resume=True
    )
    assert result.steps == 6 and not (tmp_path / "run" / "history.jsonl").read_text().count("data.")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: np.save(d / "one.npy", np.zeros((10, 2))), "one.npy is a single .npy file: give an .npz file"),
        (lambda d: (d / "one.npy").write_text("a,b\n1,2\n"), "one.npy is not an .npz file numpy can read"),
    ],
)
def test_a_path_that_is_not_an_npz_file_says_so(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(ConfigError, match="data.path: ") as err:
        build_job(parse_config({"data": {"path": "one.npy"}}, "job.toml", str(tmp_path)))
    assert expected in str(err.value)


def test_token_ids_out_of_the_vocabulary_are_refused(tmp_path):
    tokens = np.arange(40).reshape(10, 4) % 7
    np.savez(tmp_path / "t.npz", x_train=tokens, y_train=tokens % 5)
    config = {"data": {"path": "t.npz", "classes": 5}, "model": {"name": "transformer", "width": 8, "heads": 2}}
    with pytest.raises(
        ConfigError, match=r"data.classes: x_train holds token ids from 0 to 6, out of range for a vocabulary of 5"
    ):
        build_job(parse_config({**config, "train": {"batch_size": 4}}, "job.toml", str(tmp_path)))


def test_a_device_the_process_does_not_see_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "job.toml").write_text("[train]\nsteps = 1\n[cluster]\ndevices = [3]\n")
    done = psfw_command(capsys, "train", tmp_path / "job.toml", "--run-dir", tmp_path / "run")
    assert done.returncode == 2 and "cluster.devices: device 3 does not exist" in done.stderr
    assert not (tmp_path / "run").exists()
