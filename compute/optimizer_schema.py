"""The optimizer spec: its fields, defaults and bounds, written once, without JAX.

A spec is a plain dict that travels as JSON, such as ``{"name": "adam",
"learning_rate": 1e-3}``, optionally with ``weight_decay`` and a ``schedule``
(``{"name": "cosine", "steps": 1000}``). The job config checks a spec with
``check_spec`` before anything runs; a shard checks it again when it builds the
optimizer (``psfw.compute.optimizers``): the same rules, the same words.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine", "linear")
STEP_LIMIT = 2**31 - 1  # optax counts a schedule's steps in int32: a longer one overflows at its first update


class Field(NamedTuple):
    default: float
    ok: Callable[[float], bool]
    words: str  # the rule, as an error message says it
    whole: bool = False  # a whole number (a count of steps)


_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_STEPS = (lambda v: 1 <= v <= STEP_LIMIT, f"from 1 to {STEP_LIMIT}")
_WARMUP_STEPS = (lambda v: 0 <= v <= STEP_LIMIT, f"from 0 to {STEP_LIMIT}")

FIELDS: dict[str, Field] = {
    "learning_rate": Field(0.01, *_POSITIVE),
    "momentum": Field(0.9, *_FRACTION),
    "b1": Field(0.9, *_FRACTION),
    "b2": Field(0.999, *_FRACTION),
    "eps": Field(1e-8, *_POSITIVE),
    "decay": Field(0.9, *_FRACTION),
    "initial_accumulator_value": Field(0.1, *_NON_NEGATIVE),
    "weight_decay": Field(0.0, *_NON_NEGATIVE),
}
SCHEDULE_FIELDS: dict[str, Field] = {
    "steps": Field(1000, *_STEPS, whole=True),
    "warmup_steps": Field(0, *_WARMUP_STEPS, whole=True),
    "end_value": Field(0.0, *_NON_NEGATIVE),
    "decay_rate": Field(0.5, *_POSITIVE),
    "transition_steps": Field(1000, *_STEPS, whole=True),
}


class SpecError(ValueError):
    """A spec that cannot train; ``field`` is its dotted name inside the spec
    (``schedule.steps``), ``problem`` what is wrong with it; the message says both."""

    def __init__(self, field: str, problem: str, message: str = ""):
        super().__init__(message or (f"{field} {problem}" if field else problem))
        self.field, self.problem = field, problem


class Spec(NamedTuple):
    """A checked spec: every field present (defaults filled in)."""

    name: str
    fields: dict[str, float]
    schedule: str
    schedule_fields: dict[str, float]


def check_spec(spec: Any) -> Spec:
    """``spec`` checked against the schema; SpecError naming the field otherwise:
    a NaN or an out-of-range hyperparameter would train on nonsense silently, and
    so would a misspelled field left at its default or a schedule that cannot run."""
    if not isinstance(spec, dict):
        raise SpecError("", f'an optimizer spec is a JSON object such as {{"name": "sgd"}}, got {spec!r}')
    name = spec.get("name")
    if name not in OPTIMIZERS:
        use = f"use one of {', '.join(OPTIMIZERS)}"
        raise SpecError("name", f"{name!r} is not an optimizer: {use}", f"unknown optimizer {name!r}: {use}")
    fields = _checked(spec, FIELDS, "", ("schedule",))
    schedule = spec.get("schedule")
    if schedule is None:
        return Spec(name, fields, "constant", _checked({}, SCHEDULE_FIELDS, "schedule."))
    if not isinstance(schedule, dict):
        raise SpecError("schedule", f'must be a JSON object such as {{"name": "cosine"}}, got {schedule!r}')
    kind = schedule.get("name", "constant")
    if kind not in SCHEDULES:
        use = f"use one of {', '.join(SCHEDULES)}"
        raise SpecError("schedule.name", f"{kind!r} is not a schedule: {use}", f"unknown schedule {kind!r}: {use}")
    values = _checked(schedule, SCHEDULE_FIELDS, "schedule.")
    problem = schedule_problem(kind, fields["learning_rate"], values)
    if problem:
        raise SpecError(*problem)  # "schedule.steps 500 must be below ..."
    return Spec(name, fields, kind, values)


def schedule_problem(kind: str, learning_rate: float, f: dict[str, float]) -> tuple[str, str] | None:
    """(field, problem) when a schedule with these values cannot train: a warmup that
    leaves no steps to decay over, a decay that grows the rate, an end above the peak."""
    if kind == "warmup_cosine" and f["warmup_steps"] >= f["steps"]:
        return "schedule.warmup_steps", (
            f"{f['warmup_steps']} must be below optimizer.schedule.steps ({f['steps']}): warmup_cosine decays "
            "over the steps after its warmup"
        )
    if kind == "exponential" and f["decay_rate"] > 1:
        return "schedule.decay_rate", (
            f"{f['decay_rate']} would grow the learning rate without bound: use a rate in (0, 1]"
        )
    if kind in ("cosine", "warmup_cosine", "linear") and f["end_value"] > learning_rate:
        return "schedule.end_value", (
            f"{f['end_value']} is above the peak learning_rate ({learning_rate}): a schedule ends at most at its peak"
        )
    return None


def _checked(spec: dict[str, Any], fields: dict[str, Field], prefix: str, other: tuple[str, ...] = ()) -> dict:
    known = ("name", *other, *fields)
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:
        use = f"use {', '.join(known)}"
        name = prefix + unknown[0]
        raise SpecError(name, f"unknown key: {use}", f"unknown field {name!r} in the optimizer spec: {use}")
    out: dict[str, float] = {}
    for field, rule in fields.items():
        raw = spec.get(field, rule.default)
        name = prefix + field
        is_number = isinstance(raw, numbers.Real) and not isinstance(raw, bool)
        if is_number and isinstance(raw, numbers.Integral) and abs(raw) > sys.float_info.max:
            # JSON allows integers of any length; float() of one this long is an OverflowError
            raise SpecError(name, f"is out of range, got an integer of {len(str(abs(raw)))} digits")
        if rule.whole:
            if not is_number or not float(raw).is_integer():
                raise SpecError(name, f"must be a whole number, got {raw!r}")
            value: float = int(raw)
        else:
            if not is_number:
                raise SpecError(name, f"must be a number, got {raw!r}")
            if not math.isfinite(raw):
                raise SpecError(name, f"must be a finite number, got {raw!r}")
            value = float(raw)
        if not rule.ok(value):
            raise SpecError(name, f"must be {rule.words}, got {raw!r}")
        out[field] = value
    return out
