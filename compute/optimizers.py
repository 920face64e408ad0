"""Server-side optimizers, built from a plain spec so that it can travel as JSON.

A spec is a dict such as ``{"name": "adam", "learning_rate": 1e-3}``, optionally with
``weight_decay`` and a ``schedule`` (``{"name": "cosine", "steps": 1000}``). The
config validates specs; this module turns one into an optax transformation.
Every optimizer offered is element-wise, so splitting a parameter into slices on
different shards gives exactly the update of the whole parameter.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import Any

import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine", "linear")

# A rule is a test and how it reads in an error message.
Rule = tuple[Callable[[float], bool], str]
_POSITIVE: Rule = (lambda v: v > 0, "> 0")
_NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
_FRACTION: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
# optax counts steps in int32: a longer schedule overflows at its first update
STEP_LIMIT = 2**31 - 1
_STEPS: Rule = (lambda v: 1 <= v <= STEP_LIMIT, f"from 1 to {STEP_LIMIT}")
_WARMUP_STEPS: Rule = (lambda v: 0 <= v <= STEP_LIMIT, f"from 0 to {STEP_LIMIT}")

# field: (default, rule, whole number); the same bounds as psfw.jobs.config.OptimizerConfig
FIELDS: dict[str, tuple[float, Rule, bool]] = {
    "learning_rate": (0.01, _POSITIVE, False),
    "momentum": (0.9, _FRACTION, False),
    "b1": (0.9, _FRACTION, False),
    "b2": (0.999, _FRACTION, False),
    "eps": (1e-8, _POSITIVE, False),
    "decay": (0.9, _FRACTION, False),
    "initial_accumulator_value": (0.1, _NON_NEGATIVE, False),
    "weight_decay": (0.0, _NON_NEGATIVE, False),
}
SCHEDULE_FIELDS: dict[str, tuple[float, Rule, bool]] = {
    "steps": (1000, _STEPS, True),
    "warmup_steps": (0, _WARMUP_STEPS, True),
    "end_value": (0.0, _NON_NEGATIVE, False),
    "decay_rate": (0.5, _POSITIVE, False),
    "transition_steps": (1000, _STEPS, True),
}


def _checked(
    spec: dict[str, Any], fields: dict[str, tuple[float, Rule, bool]], prefix: str = "", other: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The numeric fields of ``spec`` (defaults filled in), each checked against its
    rule: a NaN or an out-of-range hyperparameter would train on nonsense silently,
    and so would a misspelled field left at its default."""
    known = ("name", *other, *fields)
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:
        raise ValueError(f"unknown field {prefix + unknown[0]!r} in the optimizer spec: use {', '.join(known)}")
    out: dict[str, Any] = {}
    for field, (default, (ok, words), whole) in fields.items():
        raw = spec.get(field, default)
        name = prefix + field
        is_number = isinstance(raw, numbers.Real) and not isinstance(raw, bool)
        if is_number and isinstance(raw, numbers.Integral) and abs(raw) > sys.float_info.max:
            # JSON allows integers of any length; float() of one this long is an OverflowError
            raise ValueError(f"{name} is out of range, got an integer of {len(str(abs(raw)))} digits")
        if whole:
            if not is_number or not float(raw).is_integer():
                raise ValueError(f"{name} must be a whole number, got {raw!r}")
            value: float = int(raw)
        else:
            if not is_number:
                raise ValueError(f"{name} must be a number, got {raw!r}")
            if not math.isfinite(raw):
                raise ValueError(f"{name} must be a finite number, got {raw!r}")
            value = float(raw)
        if not ok(value):
            raise ValueError(f"{name} must be {words}, got {raw!r}")
        out[field] = value
    return out


def build_schedule(learning_rate: float, schedule: dict[str, Any] | None) -> optax.ScalarOrSchedule:
    """A learning rate or an optax schedule for it.

    Raises ValueError naming the field when the schedule is not understood.
    """
    if schedule is None:
        return learning_rate
    if not isinstance(schedule, dict):
        raise ValueError(f'schedule must be a JSON object such as {{"name": "cosine"}}, got {schedule!r}')
    name = schedule.get("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    f = _checked(schedule, SCHEDULE_FIELDS, "schedule.")
    steps, end = f["steps"], f["end_value"]
    # a schedule that cannot train (the config refuses the same: psfw.jobs.config.schedule_problem)
    if name == "warmup_cosine" and f["warmup_steps"] >= steps:
        raise ValueError(f"schedule.warmup_steps {f['warmup_steps']} must be below schedule.steps ({steps})")
    if name == "exponential" and f["decay_rate"] > 1:
        raise ValueError(f"schedule.decay_rate {f['decay_rate']} would grow the learning rate: use (0, 1]")
    if name in ("cosine", "warmup_cosine", "linear") and end > learning_rate:
        raise ValueError(f"schedule.end_value {end} is above the peak learning_rate ({learning_rate})")
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, steps, alpha=end / learning_rate)
    if name == "exponential":
        return optax.exponential_decay(learning_rate, f["transition_steps"], f["decay_rate"])
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, f["warmup_steps"], steps, end_value=end)
    if name == "linear":
        return optax.linear_schedule(learning_rate, end, steps)
    return learning_rate


def build_optimizer(spec: dict[str, Any]) -> optax.GradientTransformation:
    """An optax transformation for ``spec`` (see the module docstring).

    Raises ValueError naming the field when the spec is not understood.
    """
    if not isinstance(spec, dict):
        raise ValueError(f'an optimizer spec is a JSON object such as {{"name": "sgd"}}, got {spec!r}')
    name = spec.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    f = _checked(spec, FIELDS, other=("schedule",))
    lr = build_schedule(f["learning_rate"], spec.get("schedule"))
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
