"""psfw: an asyncio parameter-server microframework for data-parallel JAX training.

The public API is small:

- ``load_config(path)`` / ``Config``: a validated job description (TOML);
- ``train(config, run_dir)``: the embedded default, shards + stub + workers in one
  process; ``train_async`` is the same inside a running event loop;
- ``Model``, ``mlp``, ``cnn``: models as pure ``init``/``loss`` functions;
- ``ShardServer`` / ``serve``: one parameter-server shard over gRPC;
- ``ShardClient``: the put/get/update verbs against a running shard;
- ``Cluster``: a client script's view of running shards (status, read a parameter).

Names load lazily, so ``import psfw`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "psfw.jobs.config",
    "load_config": "psfw.jobs.config",
    "train": "psfw.jobs.embedded",
    "train_async": "psfw.jobs.embedded",
    "TrainResult": "psfw.jobs.embedded",
    "Model": "psfw.compute.models",
    "mlp": "psfw.compute.models",
    "cnn": "psfw.compute.models",
    "ShardServer": "psfw.services.server",
    "serve": "psfw.services.server",
    "ShardClient": "psfw.runtime.grpc_transport",
    "Cluster": "psfw.tools.cluster",
    "PsfwError": "psfw.protocol.errors",
    "ConfigError": "psfw.protocol.errors",
    "ShardError": "psfw.protocol.errors",
    "UsageError": "psfw.protocol.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psfw' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
