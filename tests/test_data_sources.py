"""Where a job's data comes from: the shipped regression and text sets, a user's
.npz file, a folder of memory-mapped .npy files (read the rows numpy would), a
``load()`` module with its options; runs on a user's files resume."""

import numpy as np
import pytest

from psfw.compute.datasets import Rows
from psfw.compute.user_data import NpyFile
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job

from helpers import assert_params_close, data_job, reference


def regression_arrays(rows=300, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, 2)) + 0.1 * rng.normal(size=(rows, 2))).astype(np.float32)
    return x, y


@pytest.mark.unit
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
async def test_a_memory_mapped_npy_folder_trains_like_single_process_training(tmp_path):
    """Float targets of two values per row (regression), read from memory-mapped
    files: the test split is a view of rows, and the result equals plain training."""
    x, y = regression_arrays()
    (tmp_path / "set").mkdir()
    np.save(tmp_path / "set" / "x_train.npy", x)
    np.save(tmp_path / "set" / "y_train.npy", y)
    config = parse_config(data_job({"path": "set", "test_fraction": 0.1}), "job.toml", str(tmp_path))
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
    config = parse_config(data_job({"path": "d.npz", "classes": 4}, steps=40), "job.toml", str(tmp_path))
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
    config = parse_config(data_job(data, steps=3), "job.toml", str(tmp_path))
    job = build_job(config)
    assert len(job.data.x_train) == 90 and len(job.data.x_test) == 30
    result = await train_async(config, progress=False, outputs=False)
    assert_params_close(result.params, reference(config, 3))


@pytest.mark.unit
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
    settings = data_job({"path": "d.npz", "classes": 2}, steps=4, checkpoint_every=2)
    await train_async(parse_config(settings, "job.toml", str(tmp_path)), tmp_path / "run", progress=False)
    settings["train"]["steps"] = 6
    result = await train_async(
        parse_config(settings, "job.toml", str(tmp_path)), tmp_path / "run", progress=False, resume=True
    )
    assert result.steps == 6 and not (tmp_path / "run" / "history.jsonl").read_text().count("data.")
