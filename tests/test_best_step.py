"""train.keep_best: the checkpoint of the best evaluation is kept apart from the
rotation, through kill and resume, and read back by --step best."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import psfw
from psfw.base.errors import ConfigError
from psfw.cli.main import main
from psfw.jobs.config import load_config
from psfw.jobs.embedded import train
from psfw.jobs.job import build_job
from psfw.jobs.trained import evaluate_run

# 64 training rows and a wide layer: the test loss is lowest after about 10 steps,
# then rises as the model learns the training rows by heart
OVERFIT = """
seed = 0
[model]
name = "mlp"
hidden = [256]
[data]
name = "synthetic"
features = 20
classes = 10
train = 64
test = 512
[train]
batch_size = 32
steps = {steps}
log_every = 40
eval_every = 10
checkpoint_every = 10
keep_best = "test_loss"
[optimizer]
name = "adam"
learning_rate = 0.01
[cluster]
workers_per_group = 2
workers_per_process = 2
servers = 2
"""


def _config(tmp_path, steps=120):
    path = tmp_path / "overfit.toml"
    path.write_text(OVERFIT.format(steps=steps))
    return path


def _evals(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["test_loss"] for r in records if (r.get("eval") or r.get("final")) and r["step"] > 0}


@pytest.mark.slow
def test_the_best_evaluation_is_kept_apart_from_the_rotation_and_read_back(tmp_path, capsys):
    path = _config(tmp_path)
    run = tmp_path / "run"
    result = train(load_config(path), run, progress=False)
    evals = _evals(run)
    best = min(evals, key=evals.get)
    assert best < 100, evals  # the best step is not among the three newest the rotation keeps
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [f"step-{s:08d}" for s in (100, 110, 120)]
    record = json.loads((run / "checkpoints" / "best" / "BEST.json").read_text())
    assert record == {"step": best, "metric": "test_loss", "value": evals[best], "mode": "min"}
    assert result.best == record and f"best step {best} (test loss " in result.summary()
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["step"] == 120 and final["best_step"] == best
    assert final["best_test_loss"] == evals[best]
    capsys.readouterr()
    assert main(["eval", str(path), "--run-dir", str(run), "--step", "best", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["step"] == best and again["test_loss"] == pytest.approx(evals[best], rel=1e-6)
    model = psfw.load_model(run, step="best")
    assert model.step == best
    assert main(["predict", str(path), "--run-dir", str(run), "--step", "best"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"step {best}: 512 rows")


@pytest.mark.slow
def test_the_best_step_survives_a_kill_and_a_resume_goes_on_from_it(tmp_path):
    path = _config(tmp_path, steps=3000)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "psfw.cli", "train", str(path), "--run-dir", str(run), "--no-progress"]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        best = run / "checkpoints" / "best" / "BEST.json"
        while not (best.exists() and _newest(run) >= 50):  # the best kept, then 4 checkpoints more
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    kept = json.loads(best.read_text())
    assert kept["step"] <= 20 and kept["value"] == _evals(run)[kept["step"]]  # 10, or 20 if a busy machine skipped 10
    # resumed, it trains on 100 steps more and keeps the best it had: the later steps are worse
    target = _newest(run) + 100
    result = train(load_config(path, [f"train.steps={target}"]), run, progress=False, resume=True)
    assert result.best == kept
    # no other step's checkpoint was linked aside and left behind
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == [f"best-{kept['step']:08d}"]
    assert psfw.load_model(run, step="best").step == kept["step"]


def _newest(run) -> int:
    """The newest numbered checkpoint's step (-1: none yet)."""
    return max((int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")), default=-1)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("train_keys", "said"),
    [
        (
            'keep_best = "test_loss"\neval_every = 10',
            "train.keep_best: keeps the checkpoint of the best evaluation, so the evaluations must fall on "
            "checkpoints: set train.eval_every to a multiple of train.checkpoint_every (now 10 and 0)",
        ),
        ('keep_best = "test_loss"\neval_every = 15\ncheckpoint_every = 10', "(now 15 and 10)"),
        ('best_mode = "max"', "train.best_mode: says which way train.keep_best's metric is better: set keep_best too"),
        ("stop_after = 3", "train.stop_after: counts evaluations without a better train.keep_best: set keep_best too"),
        (
            'keep_best = "accuracy"\neval_every = 10\ncheckpoint_every = 10',
            "train.keep_best: 'accuracy' is no metric the evaluations record: use one of ['test_loss', "
            "'test_accuracy']",
        ),
    ],
)
def test_a_keep_best_that_cannot_work_is_a_config_error(tmp_path, train_keys, said):
    path = tmp_path / "job.toml"
    path.write_text(f'[model]\nname = "mlp"\nhidden = [8]\n[train]\nsteps = 20\n{train_keys}\n')
    with pytest.raises(ConfigError) as err:
        build_job(load_config(path))
    assert said in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_step_best_of_a_run_that_kept_none_is_one_line(tmp_path, capsys):
    path = _config(tmp_path, steps=20)
    run = tmp_path / "run"
    train(load_config(path, ["train.keep_best=", "train.checkpoint_every=0"]), run, progress=False)
    assert main(["eval", str(path), "--run-dir", str(run), "--step", "best"]) == 2
    err = capsys.readouterr().err
    assert "keeps no best step: train with train.keep_best" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_stop_after_ends_the_run_when_the_kept_metric_stops_improving(tmp_path):
    path = _config(tmp_path, steps=3000)
    run = tmp_path / "run"
    result = train(load_config(path, ["train.stop_after=3"]), run, progress=False)
    assert 40 <= result.steps < 200, result.steps  # three evaluations after the best (step 10 or so), and a little
    assert result.stopped == f"test loss did not improve for 3 evaluations (the best: step {result.best['step']})"
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == result.steps and final["stopped_early"] == result.stopped
    assert final["best_step"] == result.best["step"]
    assert f"stopped early at step {result.steps}: test loss did not improve" in result.summary()
    # what the run folder says was trained is what its parameters are
    assert psfw.load_model(run).step == result.steps
    assert evaluate_run(run, load_config(path))["test_loss"] == pytest.approx(final["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_stop_after_stops_every_process_of_a_launched_job_at_the_same_step(tmp_path):
    path = _config(tmp_path, steps=3000)
    path.write_text(path.read_text().replace("workers_per_process = 2", "workers_per_process = 1"))
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "psfw.cli", "launch", str(path), "--set", "train.stop_after=3", "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] < 3000 and final["stopped_early"].startswith("test loss did not improve for 3 evaluations")
    steps = {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert max(steps) == final["step"]  # no record of a step past the end
    assert psfw.load_model(run).step == final["step"]


@pytest.mark.slow
def test_overwrite_removes_the_best_step_of_the_earlier_run(tmp_path, caplog):
    path = _config(tmp_path, steps=30)
    run = tmp_path / "run"
    train(load_config(path), run, progress=False)
    first = json.loads((run / "checkpoints" / "best" / "BEST.json").read_text())
    # a much slower learning rate: its best is another step with another value
    sets = ["optimizer.learning_rate=0.0003"]
    assert main(["train", str(path), "--run-dir", str(run), "--overwrite", "--no-progress", *_flags(sets)]) == 0
    assert "and the best step kept" in caplog.text
    again = json.loads((run / "checkpoints" / "best" / "BEST.json").read_text())
    assert again != first and again["value"] == _evals(run)[again["step"]]
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == [f"best-{again['step']:08d}"]


def _flags(sets: list[str]) -> list[str]:
    return [flag for item in sets for flag in ("--set", item)]
