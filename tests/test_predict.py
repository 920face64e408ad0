"""Using what a run trained: psfw predict, psfw.load_model and psfw generate give the
model's answers with the run's parameters (and its tables' saved rows)."""

import json
import shutil

import numpy as np
import optax
import pytest

import psfw
from psfw.base.errors import ConfigError, UsageError
from psfw.cli.main import main
from psfw.compute.clicks import auc
from psfw.jobs.config import load_config
from psfw.jobs.embedded import train
from psfw.jobs.job import build_job
from psfw.jobs.predictions import generate
from psfw.jobs.trained import evaluate_run

from helpers import EXAMPLES

# each shipped example, shortened: what it predicts must score as psfw eval does
SHORT = {
    "digits_mlp.toml": ["train.epochs=1"],
    "digits_cnn.toml": ["train.epochs=1"],
    "my_model.toml": ["train.epochs=1"],
    "my_data.toml": ["train.epochs=2"],
    "diabetes.toml": ["train.epochs=2"],
    "lm.toml": ["train.steps=6", "train.eval_every=0", "train.checkpoint_every=0", "data.seq_len=16"],
    "recsys.toml": ["data.train=20000", "data.test=4000", "train.eval_every=0"],
}


def _trained(tmp_path, example: str, extra: list[str] = ()):
    config = load_config(EXAMPLES / example, [*SHORT[example], *extra])
    run = tmp_path / "run"
    train(config, run, progress=False)
    return config, run


def _predict(config_file, run, *flags) -> int:
    return main(["predict", str(config_file), "--run-dir", str(run), *map(str, flags)])


def _score(model, predictions: np.ndarray) -> tuple[float, dict[str, float]]:
    """What psfw eval reports, computed from the predictions alone."""
    data = model.job.data
    y = np.asarray(data.y_test)
    if model.job.model.tables:  # a click probability
        p = np.clip(predictions.astype(np.float64), 1e-12, 1 - 1e-12)
        labels = y.reshape(-1)
        loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
        return loss, {"accuracy": float(((p > 0.5) == (labels > 0.5)).mean()), "auc": auc(labels, predictions)}
    if data.classes is None:  # a regression, predicted in the targets' units: the mean squared error
        mean, std = data.target_scale or (0.0, 1.0)
        return float(np.mean(((predictions - mean) / std - y.reshape(predictions.shape)) ** 2)), {}
    labels = y.reshape(predictions.shape[:-1])
    loss = float(optax.softmax_cross_entropy_with_integer_labels(np.log(np.maximum(predictions, 1e-30)), labels).mean())
    return loss, {"accuracy": float((predictions.argmax(-1) == labels).mean())}


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(SHORT))
def test_predictions_on_the_test_split_score_as_psfw_eval_does(tmp_path, example, capsys):
    config, run = _trained(tmp_path, example)
    assert main(["predict", str(EXAMPLES / example), "--run-dir", str(run), *_sets(example)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"step {build_job(config).steps}: ") and str(run / "predictions.npy") in line
    written = np.load(run / "predictions.npy")
    model = psfw.load_model(run)
    np.testing.assert_array_equal(model.predict(model.job.data.x_test), written)  # Python and CLI agree
    record = evaluate_run(run, config)
    loss, metrics = _score(model, written)
    assert loss == pytest.approx(record["test_loss"], rel=2e-4, abs=1e-5)
    for name, value in metrics.items():
        assert value == pytest.approx(record[f"test_{name}"], abs=1e-6), name
    classes = model.predicted_class(written)
    if classes is not None:
        np.testing.assert_array_equal(np.load(run / "predictions-class.npy"), classes)
    else:
        assert not (run / "predictions-class.npy").exists()


def _sets(example: str) -> list[str]:
    return [flag for item in SHORT[example] for flag in ("--set", item)]


@pytest.mark.slow
def test_a_table_models_predictions_use_the_rows_of_the_checkpoint(tmp_path, capsys):
    config, run = _trained(tmp_path, "recsys.toml")
    model = psfw.load_model(run)
    x = np.asarray(model.job.data.x_test[:500])
    trained = model.predict(x)
    # the same parameters with every row at its initial value answer otherwise
    untrained = psfw.TrainedModel(model.job, model.step, _flat(model), {n: _empty() for n in model.job.model.tables})
    assert np.abs(trained - untrained.predict(x)).max() > 0.05
    # the rows of the checkpoint, moved where a cluster's shards keep theirs
    shards = tmp_path / "shards"
    shutil.move(run / "checkpoints", shards)
    with pytest.raises(UsageError, match="has no complete checkpoint"):
        psfw.load_model(run)
    np.testing.assert_array_equal(psfw.load_model(run, checkpoint_dir=shards).predict(x), trained)
    np.save(tmp_path / "rows.npy", x)
    out = tmp_path / "p.npz"
    assert _predict(EXAMPLES / "recsys.toml", run, *_sets("recsys.toml"), "--input", tmp_path / "rows.npy",
                    "--output", out, "--checkpoint-dir", shards) == 0  # fmt: skip
    with np.load(out) as saved:
        assert saved.files == ["predictions"]
        np.testing.assert_array_equal(saved["predictions"], trained)


def _flat(model) -> dict[str, np.ndarray]:
    from psfw.compute.params import flatten_params

    flat, _ = flatten_params(model.params)
    return {n: np.asarray(v) for n, v in flat.items()}


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros((0, 17), np.float32)


@pytest.mark.slow
def test_a_checkpoints_step_and_an_npz_input_predict_with_that_steps_parameters(tmp_path, capsys):
    config, run = _trained(tmp_path, "digits_mlp.toml", ["train.checkpoint_every=5"])
    rows = np.asarray(build_job(config).data.x_test[:40])
    np.savez(tmp_path / "rows.npz", x=rows)
    out = tmp_path / "out" / "p.npz"
    assert (
        _predict(EXAMPLES / "digits_mlp.toml", run, "--step", 15, "--input", tmp_path / "rows.npz", "--output", out)
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1].startswith("step 15: 40 rows of ")
    at15 = psfw.load_model(run, step=15)
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["predictions"], at15.predict(rows))
        np.testing.assert_array_equal(saved["class"], saved["predictions"].argmax(1))
    assert not np.allclose(psfw.load_model(run).predict(rows), at15.predict(rows))


@pytest.mark.slow
def test_bad_inputs_are_refused_in_one_line(tmp_path, capsys):
    config, run = _trained(tmp_path, "digits_mlp.toml")
    config_file = EXAMPLES / "digits_mlp.toml"
    np.save(tmp_path / "wide.npy", np.zeros((3, 65), np.float32))
    np.savez(tmp_path / "other.npz", y=np.zeros(3))
    cases = [
        (["--input", tmp_path / "wide.npy"], "psfw predict: x has rows of shape [65], but the model was trained on rows of shape [64]"),
        (["--input", tmp_path / "other.npz"], "holds ['y'], but no array x (or x_test) to predict"),
        (["--input", tmp_path / "none.npy"], "no such file"),
        (["--output", tmp_path / "p.csv"], "give a .npy or an .npz file name"),
        (["--step", 7], "has no complete checkpoint of step 7"),
    ]  # fmt: skip
    for flags, said in cases:
        assert _predict(config_file, run, *flags) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(["predict", str(config_file), "--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such run folder" in capsys.readouterr().err
    assert main(["generate", str(config_file), "--run-dir", str(run), "--prompt", "x"]) == 2
    assert "needs a byte-level language model" in capsys.readouterr().err


@pytest.mark.unit
def test_a_model_whose_predict_does_not_fit_is_a_config_error(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(
        "import jax.numpy as jnp\n"
        "def init(key):\n    return {'w': jnp.zeros((64, 10))}\n"
        "def loss(params, x, y):\n    return jnp.mean((x @ params['w']) ** 2)\n"
        "def predict(params, x):\n    return jnp.sum(x @ params['w'])\n"
    )
    config = tmp_path / "job.toml"
    config.write_text('[model]\nname = "custom"\npath = "model.py"\n[data]\nname = "digits"\n')
    with pytest.raises(ConfigError, match=r"model.path: .*predict\(params, x\) must give one answer per row"):
        build_job(load_config(config))
    model.write_text(model.read_text().replace("jnp.sum(x @ params['w'])", "x @ params['v']"))
    with pytest.raises(ConfigError, match=r"predict\(params, x\) fails on a batch of float32\[.*KeyError"):
        build_job(load_config(config))


@pytest.mark.slow
def test_a_language_model_writes_bytes_after_its_prompt(tmp_path, capsys):
    config, run = _trained(tmp_path, "lm.toml")
    model = psfw.load_model(run)
    capsys.readouterr()  # the training's lines
    greedy = generate(model, b"def ", 12, temperature=0)
    assert len(greedy) == 12 and greedy == generate(model, b"def ", 12, temperature=0)
    drawn = [generate(model, b"def ", 12, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert drawn[0] == drawn[1] and len(drawn[2]) == 12
    # a prompt longer than the model's window: it reads the last seq_len bytes
    assert len(generate(model, b"x" * 40, 3, temperature=0)) == 3
    flags = ["--run-dir", str(run), *_sets("lm.toml"), "--prompt", "def ", "--bytes", "12", "--temperature", "0"]
    assert main(["generate", str(EXAMPLES / "lm.toml"), *flags]) == 0
    assert capsys.readouterr().out == "def " + greedy.decode("utf-8", errors="replace") + "\n"


@pytest.mark.slow
def test_psfw_eval_takes_a_test_only_file(tmp_path, capsys):
    config, run = _trained(tmp_path, "digits_mlp.toml")
    data = build_job(config).data
    x, y = np.asarray(data.x_test[:100]), np.asarray(data.y_test[:100])
    np.savez(tmp_path / "test.npz", x=x, y=y)
    assert (
        main(
            [
                "eval",
                str(EXAMPLES / "digits_mlp.toml"),
                "--run-dir",
                str(run),
                "--input",
                str(tmp_path / "test.npz"),
                "--json",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["test_accuracy"] == pytest.approx((psfw.load_model(run).predict(x).argmax(1) == y).mean())
    assert record["test_accuracy"] != evaluate_run(run, config)["test_accuracy"]  # not the config's split
    np.savez(tmp_path / "bad.npz", x_test=x, y_test=y + 10)
    np.savez(tmp_path / "train.npz", x_train=x, y_train=y)
    for name, said in [
        ("bad.npz", "y_test holds values from 10 to 19, out of range for classes = 10"),
        ("train.npz", "holds ['x_train', 'y_train']: give x_test and y_test (or x and y) to evaluate on"),
    ]:
        assert (
            main(["eval", str(EXAMPLES / "digits_mlp.toml"), "--run-dir", str(run), "--input", str(tmp_path / name)])
            == 2
        )
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
