"""Checks of the config beyond its types, each with the reason a user is told: the
seed's and the shard count's bounds, and a ``--set`` key against the schema's tables."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from psfw.protocol.errors import ConfigError

SEED_MAX = 2**32 - 1  # jax.random.PRNGKey(2**32) is PRNGKey(0)
MAX_SERVERS = 1024


def check_seed(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        # numpy's generators refuse a negative seed; JAX's key keeps only its low 32 bits
        raise ValueError(f"must be from 0 to {SEED_MAX}: a seed is 32 bits (a larger one makes a smaller one's key)")
    return seed


def check_servers(servers: int) -> int:
    if servers > MAX_SERVERS:
        raise ValueError(
            f"at most {MAX_SERVERS}: every worker process keeps a connection to each shard and sends each "
            "one Update a step (more shards than that cost more than they spread)"
        )
    return servers


def _table(root: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The config table ``key`` names in the schema (``train``: TrainConfig), or None
    for a value, an unknown key, or a free table such as ``model.options``."""
    table: type[BaseModel] | None = root
    for part in key.split(".") if key else []:
        field = table.model_fields.get(part) if table else None
        if field is None:
            return None
        found = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type)]
        table = next((t for t in found if issubclass(t, BaseModel)), None)
    return table


def _free_table(table: type[BaseModel], name: str) -> bool:
    """Whether ``table.name`` is a dict of the user's keys (``model.options``)."""
    annotation = table.model_fields[name].annotation
    return annotation is dict or getattr(annotation, "__origin__", None) is dict


def check_override(root: type[BaseModel], item: str, key: str, value: Any) -> None:
    """ConfigError naming the override ``item`` that sets a table of ``root`` to a
    value, or a key inside a value: either would be reported later against the file
    or against another override. An empty value (``--set KEY=``) is not checked."""
    if value == "":
        return
    if _table(root, key) is not None and not isinstance(value, dict):
        raise ConfigError(f"--set {item}: {key} is a table: set a key in it, e.g. --set {key}.KEY=VALUE")
    parts = key.split(".")
    for depth in range(1, len(parts)):
        above, name = ".".join(parts[:depth]), parts[depth - 1]
        parent = _table(root, ".".join(parts[: depth - 1]))
        if parent is not None and name in parent.model_fields and _table(root, above) is None:
            if not _free_table(parent, name):
                raise ConfigError(f"--set {item}: {above} is a value, not a table: set {above} itself")
