"""JAX numerics for psfw: models, losses, the jitted gradient step, data, net export."""

from psfw.compute.batching import BatchOrder, split_batch, split_sizes
from psfw.compute.datasets import Dataset, load_dataset
from psfw.compute.models import Model, cnn, load_user_model, mlp
from psfw.compute.optimizers import build_optimizer
from psfw.compute.step import make_eval_fn, make_grad_step

__all__ = [
    "BatchOrder",
    "Dataset",
    "Model",
    "build_optimizer",
    "cnn",
    "load_dataset",
    "load_user_model",
    "make_eval_fn",
    "make_grad_step",
    "mlp",
    "split_batch",
    "split_sizes",
]
