"""Optimizer specs travel as JSON to the shards: a spec that would train on nonsense
(a NaN learning rate, a momentum of 1, zero schedule steps) is refused by name."""

import json

import jax
import numpy as np
import optax
import pytest

from psfw.compute.optimizers import build_optimizer

NAN, INF = float("nan"), float("inf")

BAD_SPECS = {
    "nan learning rate": ({"name": "sgd", "learning_rate": NAN}, "learning_rate must be a finite number, got nan"),
    "infinite learning rate": ({"name": "sgd", "learning_rate": INF}, "learning_rate must be a finite number, got inf"),
    "zero learning rate": ({"name": "sgd", "learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
    "text learning rate": ({"name": "sgd", "learning_rate": "x"}, "learning_rate must be a number, got 'x'"),
    "boolean learning rate": ({"name": "sgd", "learning_rate": True}, "learning_rate must be a number, got True"),
    "momentum of one": ({"name": "momentum", "momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
    "negative momentum": ({"name": "nesterov", "momentum": -0.1}, "momentum must be in [0, 1), got -0.1"),
    "b1 nan": ({"name": "adam", "b1": NAN}, "b1 must be a finite number, got nan"),
    "b2 of one": ({"name": "adam", "b2": 1}, "b2 must be in [0, 1), got 1"),
    "zero eps": ({"name": "adam", "eps": 0}, "eps must be > 0, got 0"),
    "rmsprop decay": ({"name": "rmsprop", "decay": 1.5}, "decay must be in [0, 1), got 1.5"),
    "negative accumulator": (
        {"name": "adagrad", "initial_accumulator_value": -1},
        "initial_accumulator_value must be >= 0, got -1",
    ),
    "negative weight decay": ({"name": "sgd", "weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    "infinite weight decay": ({"name": "adam", "weight_decay": INF}, "weight_decay must be a finite number, got inf"),
    "zero schedule steps": (
        {"name": "sgd", "schedule": {"name": "cosine", "steps": 0}},
        "schedule.steps must be from 1 to 2147483647, got 0",
    ),
    "fractional schedule steps": (
        {"name": "sgd", "schedule": {"name": "linear", "steps": 2.5}},
        "schedule.steps must be a whole number, got 2.5",
    ),
    "text schedule steps": (
        {"name": "sgd", "schedule": {"name": "cosine", "steps": "a"}},
        "schedule.steps must be a whole number, got 'a'",
    ),
    "negative warmup": (
        {"name": "sgd", "schedule": {"name": "warmup_cosine", "warmup_steps": -1}},
        "schedule.warmup_steps must be from 0 to 2147483647, got -1",
    ),
    "zero decay rate": (
        {"name": "sgd", "schedule": {"name": "exponential", "decay_rate": 0}},
        "schedule.decay_rate must be > 0, got 0",
    ),
    "nan end value": (
        {"name": "sgd", "schedule": {"name": "linear", "end_value": NAN}},
        "schedule.end_value must be a finite number, got nan",
    ),
    "unknown schedule": ({"name": "sgd", "schedule": {"name": "step"}}, "unknown schedule 'step'"),
    "schedule not an object": ({"name": "sgd", "schedule": "cosine"}, "schedule must be a JSON object"),
    "unknown field": ({"name": "sgd", "learnig_rate": 0.1}, "unknown field 'learnig_rate'"),
    "unknown schedule field": (
        {"name": "sgd", "schedule": {"name": "cosine", "step": 10}},
        "unknown field 'schedule.step'",
    ),
    "spec not an object": ([1], "an optimizer spec is a JSON object"),
    "unknown name": ({"name": "lbfgs"}, "unknown optimizer 'lbfgs'"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_spec_that_cannot_train_is_a_value_error_naming_the_field_and_value(case):
    spec, fragment = BAD_SPECS[case]
    with pytest.raises(ValueError) as err:
        build_optimizer(spec)
    assert fragment in str(err.value)


@pytest.mark.unit
def test_a_nan_learning_rate_from_json_is_refused():
    """Python's json reads NaN: the spec a shard receives can hold it."""
    with pytest.raises(ValueError, match="learning_rate must be a finite number, got nan"):
        build_optimizer(json.loads('{"name": "sgd", "learning_rate": NaN}'))


@pytest.mark.unit
@pytest.mark.parametrize("field", ["learning_rate", "schedule"])
def test_an_integer_too_long_for_a_float_is_refused_not_an_overflow(field):
    """JSON integers have no length limit; float() of one raises OverflowError."""
    huge = "1" + "0" * 400
    text = (
        f'{{"name": "sgd", "learning_rate": {huge}}}'
        if field == "learning_rate"
        else f'{{"name": "sgd", "schedule": {{"name": "cosine", "steps": {huge}}}}}'
    )
    with pytest.raises(ValueError, match="out of range, got an integer of 401 digits"):
        build_optimizer(json.loads(text))


@pytest.mark.unit
@pytest.mark.parametrize("name", ["cosine", "linear", "warmup_cosine", "exponential"])
def test_the_longest_schedule_updates_and_a_longer_one_is_refused(name):
    """optax counts steps in int32: the limit is where an update would overflow."""
    import jax.numpy as jnp

    from psfw.compute.optimizer_schema import STEP_LIMIT

    length = {"steps": STEP_LIMIT, "warmup_steps": 10, "transition_steps": STEP_LIMIT}
    opt = build_optimizer({"name": "sgd", "schedule": {"name": name, **length}})
    params = jnp.ones(3)
    updates, _ = opt.update(jnp.ones(3), opt.init(params), params)
    assert jnp.isfinite(updates).all()
    with pytest.raises(ValueError, match=f"steps must be from 1 to {STEP_LIMIT}"):
        build_optimizer({"name": "sgd", "schedule": {"name": name, "steps": STEP_LIMIT + 1}})


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec",
    [
        {"name": "sgd"},
        {"name": "sgd", "learning_rate": 1},
        {"name": "momentum", "momentum": 0.0, "weight_decay": 1e-4},
        {"name": "adam", "b1": 0.0, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.01},
        {"name": "rmsprop", "decay": 0.0},
        {"name": "adagrad", "initial_accumulator_value": 0},
        {"name": "sgd", "schedule": {"name": "warmup_cosine", "steps": 10, "warmup_steps": 2, "end_value": 0.0}},
        {"name": "sgd", "schedule": {"name": "exponential", "transition_steps": 5, "decay_rate": 0.9}},
        {"name": "sgd", "schedule": {"name": "constant"}},
    ],
)
def test_valid_specs_build_an_optimizer_that_updates_under_jit(spec):
    opt = build_optimizer(spec)
    params = np.ones(3, np.float32)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(np.full(3, 0.5, np.float32), state, params)
        return optax.apply_updates(params, updates), state

    new, state = step(params, opt.init(params))
    new, _ = step(new, state)  # a warmup starts at a learning rate of 0
    assert np.isfinite(np.asarray(new)).all() and not np.array_equal(np.asarray(new), params)


@pytest.mark.unit
def test_the_config_default_spec_builds():
    """The spec the config sends (every field, defaults included) is accepted."""
    from psfw.jobs.config import parse_config

    spec = json.loads(parse_config({}).optimizer.spec_json())
    build_optimizer(spec)


def test_the_config_checks_specs_with_the_shards_schema_and_no_jax():
    """One schema: loading a config (and checking its optimizer) needs no JAX."""
    import subprocess
    import sys

    code = (
        "import sys; from psfw.jobs.config import parse_config; "
        "parse_config({'optimizer': {'name': 'adam', 'schedule': {'name': 'cosine'}}}); "
        "print(sorted(m for m in ('jax', 'optax') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.unit
@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "warmup_cosine", "steps": 100, "warmup_steps": 500},
        {"name": "warmup_cosine", "steps": 100, "warmup_steps": 100},
        {"name": "exponential", "decay_rate": 5.0},
        {"name": "linear", "end_value": 5.0},
        {"name": "cosine", "end_value": 0.2},
        {"name": "warmup_cosine", "steps": 100, "warmup_steps": 99, "end_value": 0.0},
        {"name": "exponential", "decay_rate": 1.0},
        {"name": "linear", "end_value": 0.1},
    ],
)
def test_the_config_and_the_shard_refuse_the_same_schedules(schedule):
    """A schedule that cannot train is refused by both, in the same words' field."""
    from psfw.base.errors import ConfigError
    from psfw.jobs.config import parse_config

    spec = {"name": "sgd", "learning_rate": 0.1, "schedule": schedule}
    try:
        parse_config({"optimizer": spec})
    except ConfigError as err:
        field = str(err).split(": ")[1].removeprefix("optimizer.")
        with pytest.raises(ValueError, match=field):
            build_optimizer(spec)
    else:
        build_optimizer(spec)
