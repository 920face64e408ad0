"""psfw: an asyncio parameter-server microframework for data-parallel JAX training.

The public API is small:

- ``load_config(path)`` / ``Config``: a validated job description (TOML);
- ``train(config, run_dir)``: the embedded default, shards + stubs + workers in one
  OS process; ``train_async`` is the same inside a running event loop;
  ``train_on_ray(config, address=...)``: the job's shards and worker processes as
  Ray actors (``pip install "psfw[ray]"``), returning a ``RayRun``;
- ``load_params(run_dir)``: what a run trained, as its model's parameter pytree;
  ``load_table(run_dir, name)``: the rows of one of its embedding tables (also
  from the file ``psfw export`` wrote);
  ``load_model(run_dir)``: its model with those parameters, ready to ``predict(x)``;
- ``Model``, ``mlp``, ``cnn``: models as pure ``init``/``loss`` functions;
  ``TableSpec``: an embedding table a model declares;
- ``ShardServer`` / ``serve``: one parameter-server shard over gRPC;
- ``connect``: a ``Transport`` to one shard, with the verbs put, get, update,
  describe, restore: in-process, the bulk link (a Unix socket on this host, TCP
  elsewhere; shared memory is where a same-host Update's tensors lie), or gRPC;
  ``ShardClient`` is the gRPC one;
- ``Cluster`` / ``format_status``: a client script's view of running shards.

Names load lazily, so ``import psfw`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from psfw.version import __version__ as __version__


def _in_a_checkout() -> None:
    """In a source checkout, compute/ and services/ lie beside psfw/ (pyproject.toml maps
    them to psfw.compute and psfw.services when it installs). A Python started in the
    checkout imports this folder before any installed copy, so find those two there
    too (and nothing else of the checkout's folders)."""
    import importlib.abc
    import importlib.util
    import os.path
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "psfw", "compute")) or not os.path.isfile(
        os.path.join(root, "compute", "__init__.py")
    ):
        return  # an installed copy, whole

    class CheckoutFolders(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
            folder = {"psfw.compute": "compute", "psfw.services": "services"}.get(name)
            if folder is None:
                return None
            where = os.path.join(root, folder)
            init = os.path.join(where, "__init__.py")
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[where])

    sys.meta_path.append(CheckoutFolders())


_in_a_checkout()

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names load on first use
    from psfw.base.errors import ConfigError, PsfwError, ShardError, UsageError
    from psfw.compute.models import Model, cnn, mlp
    from psfw.compute.tables import TableSpec
    from psfw.jobs.config import Config, load_config
    from psfw.jobs.embedded import train, train_async
    from psfw.jobs.predictions import TrainedModel, load_model
    from psfw.jobs.ray_run import RayRun, train_on_ray
    from psfw.jobs.train_result import TrainResult
    from psfw.jobs.trained import load_params, load_table
    from psfw.protocol.messages import GetHeader, UpdateHeader
    from psfw.runtime.connect import connect
    from psfw.runtime.transport import Transport
    from psfw.services.server import ShardServer, serve
    from psfw.tools.cluster import Cluster, format_status

_EXPORTS = {
    "Config": "psfw.jobs.config",
    "load_config": "psfw.jobs.config",
    "train": "psfw.jobs.embedded",
    "train_async": "psfw.jobs.embedded",
    "train_on_ray": "psfw.jobs.ray_run",
    "RayRun": "psfw.jobs.ray_run",
    "TrainResult": "psfw.jobs.train_result",
    "load_params": "psfw.jobs.trained",
    "load_table": "psfw.jobs.trained",
    "load_model": "psfw.jobs.predictions",
    "TrainedModel": "psfw.jobs.predictions",
    "TableSpec": "psfw.compute.tables",
    "Model": "psfw.compute.models",
    "mlp": "psfw.compute.models",
    "cnn": "psfw.compute.models",
    "ShardServer": "psfw.services.server",
    "serve": "psfw.services.server",
    "connect": "psfw.runtime.connect",
    "Transport": "psfw.runtime.transport",
    "GetHeader": "psfw.protocol.messages",
    "UpdateHeader": "psfw.protocol.messages",
    "Cluster": "psfw.tools.cluster",
    "format_status": "psfw.tools.cluster",
    "PsfwError": "psfw.base.errors",
    "ConfigError": "psfw.base.errors",
    "ShardError": "psfw.base.errors",
    "UsageError": "psfw.base.errors",
}

__all__ = [
    "Cluster",
    "Config",
    "ConfigError",
    "GetHeader",
    "Model",
    "PsfwError",
    "RayRun",
    "ShardError",
    "ShardServer",
    "TableSpec",
    "TrainResult",
    "TrainedModel",
    "Transport",
    "UpdateHeader",
    "UsageError",
    "cnn",
    "connect",
    "format_status",
    "load_config",
    "load_model",
    "load_params",
    "load_table",
    "mlp",
    "serve",
    "train",
    "train_async",
    "train_on_ray",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psfw' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
