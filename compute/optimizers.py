"""Server-side optimizers, built from a plain spec so that it can travel as JSON.

A spec is a dict such as ``{"name": "adam", "learning_rate": 1e-3}``, optionally with
``weight_decay`` and a ``schedule`` (``{"name": "cosine", "steps": 1000}``). The
config validates specs; this module turns one into an optax transformation.
Every optimizer offered is element-wise, so splitting a parameter into slices on
different shards gives exactly the update of the whole parameter.
"""

from __future__ import annotations

from typing import Any

import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine", "linear")


def build_schedule(learning_rate: float, schedule: dict[str, Any] | None) -> optax.ScalarOrSchedule:
    """A learning rate or an optax schedule for it."""
    if not schedule or schedule.get("name", "constant") == "constant":
        return learning_rate
    name = schedule["name"]
    steps = int(schedule.get("steps", 1000))
    end = float(schedule.get("end_value", 0.0))
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, steps, alpha=end / learning_rate if learning_rate else 0.0)
    if name == "exponential":
        return optax.exponential_decay(
            learning_rate, int(schedule.get("transition_steps", steps)), float(schedule.get("decay_rate", 0.5))
        )
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, int(schedule.get("warmup_steps", 0)), steps, end_value=end
        )
    if name == "linear":
        return optax.linear_schedule(learning_rate, end, steps)
    raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")


def build_optimizer(spec: dict[str, Any]) -> optax.GradientTransformation:
    """An optax transformation for ``spec`` (see the module docstring).

    Raises ValueError naming the field when the spec is not understood.
    """
    name = spec.get("name")
    lr = build_schedule(float(spec.get("learning_rate", 0.01)), spec.get("schedule"))
    momentum = float(spec.get("momentum", 0.9))
    wd = float(spec.get("weight_decay", 0.0))
    if name == "sgd":
        opt = optax.sgd(lr)
    elif name == "momentum":
        opt = optax.sgd(lr, momentum=momentum)
    elif name == "nesterov":
        opt = optax.sgd(lr, momentum=momentum, nesterov=True)
    elif name == "adagrad":
        opt = optax.adagrad(lr, initial_accumulator_value=float(spec.get("initial_accumulator_value", 0.1)))
    elif name == "rmsprop":
        opt = optax.rmsprop(lr, decay=float(spec.get("decay", 0.9)), eps=float(spec.get("eps", 1e-8)))
    elif name == "adam":
        kw = {"b1": float(spec.get("b1", 0.9)), "b2": float(spec.get("b2", 0.999)), "eps": float(spec.get("eps", 1e-8))}
        return optax.adamw(lr, weight_decay=wd, **kw) if wd else optax.adam(lr, **kw)
    else:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt
