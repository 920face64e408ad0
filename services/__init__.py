"""The shard, psfw's deployable gRPC side: its store (rounds, update kernel,
checkpoints), the servicer, the server process. Names load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardServer": "psfw.services.server",
    "serve": "psfw.services.server",
    "ShardStore": "psfw.services.store",
}

__all__ = ["ShardServer", "ShardStore", "serve"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psfw.services' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
