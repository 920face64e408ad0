"""Pure JAX numerics for psfw: models, losses, the jitted gradient step, data, the
optimizers and their schema, net export.

Names load lazily: ``psfw.compute.optimizer_schema`` (the optimizer spec's fields
and bounds) is imported by the config without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchOrder": "psfw.compute.batching",
    "split_batch": "psfw.compute.batching",
    "split_sizes": "psfw.compute.batching",
    "Dataset": "psfw.compute.datasets",
    "load_dataset": "psfw.compute.datasets",
    "Model": "psfw.compute.models",
    "cnn": "psfw.compute.models",
    "load_user_model": "psfw.compute.models",
    "mlp": "psfw.compute.models",
    "transformer_lm": "psfw.compute.transformer",
    "NpyFile": "psfw.compute.npy_file",
    "build_optimizer": "psfw.compute.optimizers",
    "check_spec": "psfw.compute.optimizer_schema",
    "make_eval_fn": "psfw.compute.step",
    "evaluate_in_batches": "psfw.compute.step",
    "make_grad_step": "psfw.compute.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psfw.compute' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
