"""Server-side optimizers, built from a plain spec so that it can travel as JSON.

A spec is a dict such as ``{"name": "adam", "learning_rate": 1e-3}``; its fields,
defaults and bounds are ``psfw.compute.optimizer_schema`` (no JAX there: the config
checks a spec with it too). This module turns a spec into an optax transformation.
Every optimizer offered is element-wise, so splitting a parameter into slices on
different shards gives exactly the update of the whole parameter.
"""

from __future__ import annotations

from typing import Any

import optax

from psfw.compute.optimizer_schema import OPTIMIZERS, SCHEDULES, Spec, check_spec

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule"]


def build_schedule(spec: Spec) -> optax.ScalarOrSchedule:
    """The learning rate of a checked spec, or an optax schedule for it."""
    lr, f = spec.fields["learning_rate"], spec.schedule_fields
    steps, end = f["steps"], f["end_value"]
    if spec.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps, alpha=end / lr)
    if spec.schedule == "exponential":
        return optax.exponential_decay(lr, f["transition_steps"], f["decay_rate"])
    if spec.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, f["warmup_steps"], steps, end_value=end)
    if spec.schedule == "linear":
        return optax.linear_schedule(lr, end, steps)
    return lr


def build_optimizer(spec: dict[str, Any]) -> optax.GradientTransformation:
    """An optax transformation for ``spec`` (see the module docstring).

    Raises ValueError (a SpecError) naming the field when the spec is not understood.
    """
    checked = check_spec(spec)
    name, f = checked.name, checked.fields
    lr = build_schedule(checked)
    momentum, wd = f["momentum"], f["weight_decay"]
    if name == "sgd":
        opt = optax.sgd(lr)
    elif name == "momentum":
        opt = optax.sgd(lr, momentum=momentum)
    elif name == "nesterov":
        opt = optax.sgd(lr, momentum=momentum, nesterov=True)
    elif name == "adagrad":
        opt = optax.adagrad(lr, initial_accumulator_value=f["initial_accumulator_value"])
    elif name == "rmsprop":
        opt = optax.rmsprop(lr, decay=f["decay"], eps=f["eps"])
    else:  # adam
        kw = {"b1": f["b1"], "b2": f["b2"], "eps": f["eps"]}
        return optax.adamw(lr, weight_decay=wd, **kw) if wd else optax.adam(lr, **kw)
    return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt
