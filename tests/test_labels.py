"""Labels as users have them: class names and 1-based ids train as classes and come
back from predict as they were written; standardized targets come back in their
units."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris

import psfw
from psfw.base.errors import ConfigError
from psfw.cli.main import main
from psfw.jobs.config import load_config
from psfw.jobs.embedded import train
from psfw.jobs.job import build_job
from psfw.jobs.trained import evaluate_run

IRIS = """
seed = 0
[model]
name = "mlp"
hidden = [16]
[data]
path = "iris.npz"
{labels}
[train]
batch_size = 16
epochs = 40
[optimizer]
name = "adam"
learning_rate = 0.01
[cluster]
servers = 1
"""
NAMES = ["setosa", "versicolor", "virginica"]


def _iris(tmp_path, labels: str, y) -> object:
    data = load_iris()
    np.savez(tmp_path / "iris.npz", x_train=data.data.astype(np.float32), y_train=y(data.target))
    path = tmp_path / "iris.toml"
    path.write_text(IRIS.format(labels=labels))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("labels", "y", "written"),
    [
        (f"classes = {json.dumps(NAMES)}", lambda t: np.array(NAMES)[t], NAMES),
        ('labels = "map"', lambda t: t + 1, [1, 2, 3]),  # 1-based ids
        ('labels = "map"', lambda t: np.array([10, 70, 300])[t], [10, 70, 300]),  # sparse codes
    ],
)
def test_labels_as_written_train_and_come_back_from_predict(tmp_path, capsys, labels, y, written):
    path = _iris(tmp_path, labels, y)
    run = tmp_path / "run"
    result = train(load_config(path), run, progress=False)
    assert result.test_accuracy > 0.85
    assert json.loads((run / "labels.json").read_text()) == {"labels": written}
    assert main(["predict", str(path), "--run-dir", str(run)]) == 0
    classes = np.load(run / "predictions-class.npy")
    data = build_job(load_config(path)).data
    truth = np.asarray(written)[data.y_test]  # the test split's labels as the user wrote them
    assert classes.dtype == truth.dtype and set(classes.tolist()) <= set(written)
    accuracy = evaluate_run(run, load_config(path))["test_accuracy"]
    assert (classes == truth).mean() == pytest.approx(accuracy)
    np.savez(tmp_path / "test.npz", x=np.asarray(data.x_test), y=truth)  # a test file in the user's labels
    assert evaluate_run(run, load_config(path), test_file=tmp_path / "test.npz")["test_accuracy"] == accuracy


@pytest.mark.unit
def test_a_label_that_is_no_listed_class_is_one_line(tmp_path):
    path = _iris(tmp_path, 'classes = ["setosa", "versicolor"]', lambda t: np.array(NAMES)[t])
    with pytest.raises(ConfigError) as err:
        build_job(load_config(path))
    said = str(err.value)
    assert "y_train holds the label 'virginica', which is none of the classes (setosa, versicolor)" in said
    assert "\n" not in said
    path = _iris(tmp_path, "", lambda t: np.array(NAMES)[t])
    with pytest.raises(ConfigError, match=r'text labels: list them in data.classes, or set data.labels = "map"'):
        build_job(load_config(path))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data_keys", "said"),
    [
        (
            'labels = "map"\nclasses = 3',
            "data.labels: give data.classes (a number, or the label values) or data.labels",
        ),
        ("standardize_y = true\nclasses = 3", "data.standardize_y: is for a regression's targets"),
        ('name = "synthetic"\nclasses = ["a", "b"]', "data.classes: synthetic data has classes 0..N-1"),
    ],
)
def test_label_settings_that_cannot_work_together_are_config_errors(tmp_path, data_keys, said):
    path = tmp_path / "job.toml"
    body = data_keys if "name" in data_keys else f'path = "x.npz"\n{data_keys}'
    path.write_text(f"[data]\n{body}\n")
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


@pytest.mark.slow
def test_standardized_targets_are_predicted_in_their_units(tmp_path):
    data = load_diabetes()
    np.savez(tmp_path / "d.npz", x_train=data.data.astype(np.float32), y_train=data.target.astype(np.float32))
    path = tmp_path / "d.toml"
    path.write_text(
        '[model]\nname = "mlp"\nhidden = [32]\n[data]\npath = "d.npz"\nstandardize_y = true\n'
        '[train]\nbatch_size = 32\nepochs = 30\n[optimizer]\nname = "adam"\nlearning_rate = 0.003\n'
        "[cluster]\nservers = 1\n"
    )
    run = tmp_path / "run"
    result = train(load_config(path), run, progress=False)
    job = build_job(load_config(path))
    mean, std = job.data.target_scale
    assert mean == pytest.approx(152, abs=10) and std == pytest.approx(77, abs=10)  # the units of the targets
    assert json.loads((run / "labels.json").read_text()) == {"target_mean": mean, "target_std": std}
    predictions = psfw.load_model(run).predict(job.data.x_test)
    raw = np.asarray(job.data.y_test) * std + mean
    assert np.mean((predictions.reshape(-1) - raw) ** 2) == pytest.approx(result.test_loss * std**2, rel=1e-3)
    assert 0.3 < result.test_loss < 0.8  # standardized: 1.0 is what predicting the mean gives


@pytest.mark.slow
def test_a_run_whose_labels_now_mean_other_classes_is_refused(tmp_path, capsys):
    """labels = "map" takes the classes from the data: when its labels change, every
    index may name another class. psfw predict and eval refuse in one line."""
    path = _iris(tmp_path, 'labels = "map"', lambda t: t + 1)
    run = tmp_path / "run"
    train(load_config(path, ["train.epochs=2"]), run, progress=False)
    data = load_iris()
    y = data.target + 1
    y[y == 3] = 0  # as many classes, named otherwise: 0, 1, 2 now, and every index means another
    np.savez(tmp_path / "iris.npz", x_train=data.data.astype(np.float32), y_train=y)
    capsys.readouterr()
    for command in ("predict", "eval"):
        assert main([command, str(path), "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert "labels.json says the run trained with the classes [1, 2, 3], but the data of" in err, err
        assert "gives the classes [0, 1, 2] now: predict with the data the run trained on" in err
        assert len(err.strip().splitlines()) == 1
