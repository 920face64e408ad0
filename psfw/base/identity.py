"""A job's identity: what makes two runs the same job, so that shards know which job
they serve and a process never joins another job's parameters by accident.

The identity is a JSON object: the job's ``name`` (``name`` in the config, else the
config file's name, shown but not compared unless the config sets it), the
parameters (names, dtypes, shapes), the optimizer and its schedule, the data set
and the seed, and a ``fingerprint`` of those. A job's first Put gives it to the
shards; they keep it (also in checkpoints) and answer it in Describe.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

COMPARED = ("params", "optimizer", "data", "seed", "named", "tables")


def job_identity(
    config: Any, params: dict[str, tuple[str, tuple[int, ...]]], tables: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The identity of the job of ``config`` (a psfw Config) whose parameters have
    ``params``: name -> (dtype, shape); ``tables``: its embedding tables'
    declaration (rows, width, initial values, optimizer), if it has any."""
    identity: dict[str, Any] = {
        "name": config.name or Path(config.source).stem,
        "named": config.name or "",
        "params": {n: [dtype, list(shape)] for n, (dtype, shape) in sorted(params.items())},
        "optimizer": json.loads(config.optimizer.spec_json()),
        "data": config.data.model_dump(mode="json"),
        "seed": config.seed,
    }
    if tables:
        identity["tables"] = tables
    compared = json.dumps({k: identity[k] for k in COMPARED if k in identity}, sort_keys=True)
    identity["fingerprint"] = hashlib.sha256(compared.encode()).hexdigest()[:16]
    return identity


def differences(held: dict[str, Any], ours: dict[str, Any], most: int = 4) -> list[str]:
    """What differs between two identities, each as ``field: theirs -> ours``."""
    found: list[str] = []
    if held.get("named", "") != ours["named"]:
        found.append(f"name: {held.get('named') or '(none)'} -> {ours['named'] or '(none)'}")
    theirs, mine = held.get("params", {}), ours["params"]
    for name in sorted(set(theirs) | set(mine)):
        if theirs.get(name) != mine.get(name):
            found.append(f"parameter {name}: {_param(theirs.get(name))} -> {_param(mine.get(name))}")
    for section in ("optimizer", "data", "tables"):
        flat_theirs, flat_mine = flat(held.get(section, {}), section), flat(ours.get(section, {}), section)
        for key in sorted(set(flat_theirs) | set(flat_mine)):
            if flat_theirs.get(key) != flat_mine.get(key):
                found.append(f"{key}: {flat_theirs.get(key, '(unset)')} -> {flat_mine.get(key, '(unset)')}")
    if held.get("seed") != ours["seed"]:
        found.append(f"seed: {held.get('seed')} -> {ours['seed']}")
    if len(found) > most:
        found = found[:most] + [f"{len(found) - most} more"]
    return found


def summary(identity: dict[str, Any], step: int) -> str:
    """``digits_mlp (step 340, adam lr 0.002)``."""
    opt = identity.get("optimizer", {})
    return f"{identity.get('name', '?')} (step {step}, {opt.get('name', '?')} lr {opt.get('learning_rate', '?')})"


def _param(spec: list | None) -> str:
    return "absent" if spec is None else f"{spec[0]}{spec[1]}"


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"optimizer.schedule.name": ...}``."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flat(item, f"{prefix}.{key}" if prefix else key))
    return out


def changed(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> dict[str, list]:
    """The settings that differ: ``{"optimizer.learning_rate": [0.01, 0.002]}``."""
    old, new = flat(before, prefix), flat(after, prefix)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
