"""Evaluation on the test split: in batches, the mean over all rows; of the values of
its own step; once per step across a resume; of every metric a user's model
returns."""

import json

import numpy as np
import pytest

from psfw.compute.step import evaluate_in_batches, make_eval_fn
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job
from psfw.jobs.outputs import read_records


@pytest.mark.unit
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


@pytest.mark.unit
def test_an_evaluation_reads_the_values_of_its_step_when_their_buffers_are_written_over_meanwhile():
    """A transport may publish views of buffers that a later step writes over
    (psfw.runtime.step_region): the evaluation keeps a copy of its step's values."""
    import threading

    import jax

    from psfw.compute.params import flatten_params
    from psfw.jobs.evaluation import Evaluator
    from psfw.runtime.param_cache import StepValues

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
    evaluator.watch(3, StepValues(buffers))
    for value in buffers.values():
        value[...] = 0.0  # the transport writes the step after next into the same buffers
    busy.set()
    evaluator.close()
    record = evaluator.records[0]
    assert record["step"] == 3 and record["test_loss"] == pytest.approx(expected[0], rel=1e-6)


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
