"""Constants and small helpers shared by the tests."""

import json
from pathlib import Path

import jax
import numpy as np
import optax

from psfw.compute.optimizers import build_optimizer
from psfw.job import build_job
from psfw.params import flatten_params

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SGD = json.dumps({"name": "sgd", "learning_rate": 0.1})


def reference(config, steps: int) -> dict[str, np.ndarray]:
    """Plain training on the whole batch, one jitted step, the same data order."""
    job = build_job(config)
    opt = build_optimizer(config.optimizer.model_dump())
    params = job.model.init(jax.random.PRNGKey(config.seed))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(lambda p: job.model.loss(p, x, y)[0])(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    order = job.order(0)
    for s in range(steps):
        rows = order.indices(s)
        params, state = step(params, state, job.data.x_train[rows], job.data.y_train[rows])
    flat, _ = flatten_params(params)
    return {n: np.asarray(v) for n, v in flat.items()}


def assert_params_close(actual: dict, expected: dict) -> None:
    """Equal up to float rounding, parameter by parameter."""
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
