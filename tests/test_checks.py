"""What psfw checks of a job before anything starts (psfw/jobs/checks.py): what the
machine can hold, and the data. Each mistake is one line from ``psfw train``, exit 2,
and no run folder."""

import resource

import numpy as np
import pytest

from psfw.base.errors import ConfigError
from psfw.cli.main import main
from psfw.compute import user_data
from psfw.jobs.checks import available_memory
from psfw.jobs.config import load_config
from psfw.jobs.job import build_job

pytestmark = pytest.mark.unit

MLP_BYTES_PER_HIDDEN = (64 + 1 + 10) * 4  # digits: w0, b0 and w1 of a hidden unit, float32


def _train(tmp_path, capsys, text):
    """``psfw train`` of the config ``text``: its exit code, its one line, and
    whether it wrote the run folder."""
    config = tmp_path / "job.toml"
    config.write_text(text)
    run_dir = tmp_path / "run"
    code = main(["train", str(config), "--run-dir", str(run_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines, run_dir.exists(), config


def test_parameters_larger_than_the_machine_are_one_line_before_anything_starts(tmp_path, capsys):
    code, lines, written, config = _train(tmp_path, capsys, "[model]\nhidden = [100000000000]\n[train]\nsteps = 2\n")
    assert (code, written) == (2, False), lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"psfw: config error: {config}: model.name: mlp: the parameters need 30000.0 GB, ")
    assert lines[0].endswith("GB available: make the model smaller")


def test_parameters_that_fit_once_but_not_beside_the_shards_and_their_state_are_one_line(tmp_path, capsys):
    """A worker process holds the parameters once; ``psfw train`` also holds the
    shards' copy and adam's two moments: four times in all."""
    hidden = int(available_memory() * 0.45 / MLP_BYTES_PER_HIDDEN)
    text = f"[model]\nhidden = [{hidden}]\n[optimizer]\nname = 'adam'\n[train]\nsteps = 2\n"
    code, lines, written, config = _train(tmp_path, capsys, text)
    assert (code, written) == (2, False), lines
    assert len(lines) == 1, lines
    assert " twice (the workers' copy and the shards'), and the shards' optimizer state " in lines[0]
    assert lines[0].endswith("GB available: make the model smaller")


@pytest.fixture
def few_open_files():
    """This process may open 512 files for the test's length."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("transport", "servers", "need"), [("auto", 100, 656), ("grpc", 40, 576)])
def test_more_shards_than_open_files_allow_is_one_line(tmp_path, capsys, few_open_files, transport, servers, need):
    text = f"[train]\nsteps = 2\n[cluster]\nservers = {servers}\ntransport = '{transport}'\n"
    code, lines, written, config = _train(tmp_path, capsys, text)
    assert (code, written) == (2, False), lines
    assert lines == [
        f"psfw: config error: {config}: cluster.servers: {servers} shards in this process need about {need} open "
        "files, and it may open 512 (ulimit -n): lower cluster.servers, or raise the limit"
    ]


def _data_job(tmp_path, arrays, data="'data.npz'", model=""):
    """A config of the arrays (saved as ``data.npz``, or a folder of .npy files)."""
    if data == "'data.npz'":
        np.savez(tmp_path / "data.npz", **arrays)
    else:
        (tmp_path / "data").mkdir()
        for name, array in arrays.items():
            np.save(tmp_path / "data" / f"{name}.npy", array)
    config = tmp_path / "job.toml"
    config.write_text(f"{model}[data]\npath = {data}\n[train]\nbatch_size = 8\nsteps = 2\n")
    return config


def test_a_nan_in_the_inputs_is_one_line_naming_the_array_the_row_and_the_column(tmp_path):
    x = np.ones((100, 4), np.float32)
    x[37, 2] = np.nan
    config = _data_job(tmp_path, {"x_train": x, "y_train": np.ones(100, np.float32)})
    with pytest.raises(ConfigError) as err:
        build_job(load_config(config))
    assert str(err.value) == (
        f"{config}: data.path: {tmp_path / 'data.npz'}: x_train holds nan in row 37, column 2: fix or drop the "
        "rows that do (one would make every gradient NaN)"
    )


def test_an_infinity_deep_in_a_file_of_labels_is_found_a_chunk_at_a_time(tmp_path, monkeypatch):
    """A folder of .npy files is read a chunk of rows at a time (here 16 values), and
    the bad row lies chunks past the first."""
    monkeypatch.setattr(user_data, "_CHECK_CHUNK", 16)
    y = np.ones(100, np.float32)
    y[90] = -np.inf
    x = np.ones((100, 2, 3), np.float32)
    x[95, 1, 2] = np.nan  # after the label's row: the inputs are read first, so named first
    config = _data_job(tmp_path, {"x_train": x, "y_train": y}, data="'data'")
    with pytest.raises(ConfigError, match=r"data.path: .*data: x_train holds nan in row 95, column \[1, 2\]: fix"):
        build_job(load_config(config))
    np.save(tmp_path / "data" / "x_train.npy", np.ones((100, 2, 3), np.float32))
    with pytest.raises(ConfigError, match=r"y_train holds -inf in row 90: fix or drop the rows that do"):
        build_job(load_config(config))


TABLE_MODEL = """
import jax.numpy as jnp
import psfw

def make(rows=10, dim=4):
    def init(key):
        return {"w": jnp.zeros((dim,))}

    def loss(params, x, y, embedded):
        return jnp.mean((embedded["user"][:, 0] @ params["w"] - y) ** 2)

    def ids(x):
        return {"user": x[:, :1]}

    return psfw.Model(init, loss, [], {"user": psfw.TableSpec(rows, dim)}, ids)
"""


def _table_job(tmp_path, options=""):
    (tmp_path / "model.py").write_text(TABLE_MODEL)
    x_train, x_test = np.zeros((300, 2), np.int64), np.zeros((50, 2), np.int64)
    x_test[41, 0] = 10  # one past the table's last row, in a row no training batch reaches
    arrays = {"x_train": x_train, "y_train": np.ones(300, np.float32), "x_test": x_test}
    arrays["y_test"] = np.ones(50, np.float32)
    model = f"[model]\nname = 'custom'\npath = 'model.py'\n{options}"
    return _data_job(tmp_path, arrays, model=model)


def test_an_id_outside_a_bounded_table_in_any_row_is_one_line_before_step_0(tmp_path):
    config = _table_job(tmp_path)
    with pytest.raises(ConfigError) as err:
        build_job(load_config(config))
    assert str(err.value) == f"{config}: model.path: model.py: table user: id 10 is outside 0..9 (x_test row 41)"


def test_a_table_declaration_error_names_no_batch(tmp_path):
    config = _table_job(tmp_path, "options = {dim = 0}\n")
    with pytest.raises(ConfigError) as err:
        build_job(load_config(config))
    assert str(err.value) == (
        f"{config}: model.path: model.py: table user: dim 0 must be a whole number from 1 to 65536"
    )
