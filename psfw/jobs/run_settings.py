"""A run's settings: its stored ``config.json`` read back in the form the config
takes today, and what a config trains with, to compare two runs."""

from __future__ import annotations

import copy
import json
from typing import Any

from psfw.jobs.config import DATA_KEYS, MODEL_KEYS, SET_BY_LOADER, SYNTHETIC_ONLY, Config, parse_config


def stored_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A run's ``config.json`` as the settings it describes, in the form the config
    takes today: where the settings came from dropped (``base_dir``, ``source``,
    ``overrides``), and the keys an earlier psfw wrote for every data set and model
    kept only where they apply (``parse_config`` would refuse them)."""
    data = copy.deepcopy(data)
    for key in SET_BY_LOADER:
        data.pop(key, None)
    d = data.get("data")
    if isinstance(d, dict) and "path" not in d and "module" not in d:
        uses = DATA_KEYS.get(d.get("name", "digits"), ())
        for key in SYNTHETIC_ONLY:
            if key not in uses:  # the clicks log keeps its train and test rows
                d.pop(key, None)
    m = data.get("model")
    if isinstance(m, dict):
        uses = MODEL_KEYS.get(m.get("name", "mlp"), ())
        data["model"] = {k: v for k, v in m.items() if k == "name" or k in uses}
    return data


def stored_config(data: dict[str, Any], source: str) -> Config:
    """The config a ``config.json`` (``Config.model_dump_json``) holds, its relative
    paths resolving where the config file was; ``source``: what errors name."""
    base_dir, source = data.get("base_dir", "."), data.get("source", source)
    return parse_config(stored_settings(data), source, base_dir)


def settings_of(config: Config) -> dict[str, Any]:
    """What ``config`` trains with, as plain JSON values (where it came from aside):
    two configs train alike when these are equal."""
    data = json.loads(config.model_dump_json())
    for key in SET_BY_LOADER:
        data.pop(key, None)
    return data
