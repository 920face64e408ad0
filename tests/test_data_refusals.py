"""Data that cannot train, and keys of another data source or model, are one line
naming the file and the field, before anything is written."""

import json

import numpy as np
import pytest

from psfw.base.errors import ConfigError
from psfw.jobs.config import load_config, parse_config
from psfw.jobs.job import build_job

from helpers import data_job, psfw_command

pytestmark = pytest.mark.unit

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
    (tmp_path / "job.toml").write_text(_toml(data_job(data)))


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
