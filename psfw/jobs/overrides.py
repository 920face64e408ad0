"""A config's command-line overrides (``--set KEY=VALUE``): each applied to the
file's tables before they are validated, and each checked against the schema, so
that a mistake is reported against the override that made it."""

from __future__ import annotations

import copy
import tomllib
from typing import Any, get_args

from pydantic import BaseModel

from psfw.base.errors import ConfigError


def apply_overrides(
    data: dict[str, Any], overrides: list[str], root: type[BaseModel], reserved: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``data`` with each ``KEY=VALUE`` of ``overrides`` set (``--set train.epochs=5``):
    a dotted key into the tables, a value parsed as a TOML value (``5``, ``3e-4``,
    ``true``, ``[64, 64]``, ``"adam"``), else taken as text (``adam``); an empty
    value removes the key (``--set train.epochs=``, so that ``train.steps`` can take
    its place). ``root``: the config's schema; ``reserved``: top-level keys the loader
    sets, never an override. The result is validated as the file is; ConfigError
    naming the override when it cannot apply."""
    data = copy.deepcopy(data)  # tables and all (a TOML date is no JSON value)
    for item in overrides:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item}: give KEY=VALUE with a dotted key, e.g. --set train.epochs=5")
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text  # bare text: a name such as adam or diabetes
        *tables, last = key.split(".")
        check_override(root, item, key, value)
        where = data
        for depth, part in enumerate(tables):
            where = where.setdefault(part, {})
            if not isinstance(where, dict):
                above = ".".join(tables[: depth + 1])
                raise ConfigError(f"--set {item}: {above} is a value, not a table: set {above} itself")
        if key.split(".")[0] in reserved:
            raise ConfigError(f"--set {item}: {key}: unknown key (check its spelling against the config reference)")
        if not text.strip():
            if last not in where:
                raise ConfigError(f"--set {item}: the config sets no {key}, so there is nothing to remove")
            del where[last]
            continue
        where[last] = value
    return data


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
