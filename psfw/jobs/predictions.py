"""Using what a run trained: its model's predictions for new rows (``psfw predict``,
``psfw.load_model``) and text from a language model (``psfw generate``).

A ``TrainedModel`` is the model of a run's config with the parameters the run
trained (its final ones or a checkpoint's) and, for a table model, the rows its
shards saved in the checkpoint of that step; its ``predict(x)`` is the model's own
``predict``, jitted, ``train.eval_batch_size`` rows at a time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psfw.base.errors import UsageError
from psfw.compute.labels import decode, unstandardize
from psfw.compute.params import unflatten_params
from psfw.compute.tables import unique_ids
from psfw.jobs.config import Config
from psfw.jobs.job import Job, build_job
from psfw.jobs.trained import check_labels, checkpoint_folder, load_table, rows_of, run_config, trained_values
from psfw.runtime.table_feed import padded_rows, positions

__all__ = ["TrainedModel", "generate", "load_model", "write_predictions"]


class TrainedModel:
    """A run's model with the parameters it trained (see the module docstring); made
    by ``load_model``.

    Attributes:
        step: the step those parameters are of.
        params: the parameters, as the model's pytree.
        classes: the classifier's number of classes (None for a regression).
        config: the run's config.
    """

    def __init__(self, job: Job, step: int, values: dict[str, np.ndarray], tables: dict[str, tuple] | None = None):
        if job.model.predict is None:
            raise UsageError(
                f"{job.config.source}: the model defines no predict(params, x): add one to use what it trained "
                "(the shipped models have it)"
            )
        self.job, self.step = job, step
        self.params = unflatten_params(job.treedef, list(job.layout.params), values)
        self.classes: int | None = job.data.classes
        self._tables = tables or {}
        self._predict = _jitted(job.model.predict, bool(job.model.tables))

    @property
    def config(self) -> Config:
        return self.job.config

    def predict(self, x: Any, batch_size: int | None = None) -> np.ndarray:
        """What the model answers for each row of ``x``.

        Args:
            x: rows of the training inputs' shape (any array-like).
            batch_size: rows per jitted call (default: ``train.eval_batch_size``).

        Returns:
            One answer per row: a classifier's class probabilities, a regression's
            values in the targets' own units (``data.standardize_y``).

        Raises:
            UsageError: the rows are not of the training inputs' shape or kind, or
                there are none.
        """
        x = _checked_rows(self.job, x, "x")
        batch = batch_size or self.config.train.eval_batch_size
        parts = [self._batch(np.asarray(x[i : i + batch])) for i in range(0, len(x), batch)]
        if not parts:
            raise UsageError("no rows to predict: x holds 0 rows")
        return unstandardize(np.concatenate(parts), self.job.data.target_scale)

    def predicted_class(self, predictions: np.ndarray) -> np.ndarray | None:
        """The class of each row (the most probable) of a classifier's ``predict``
        answers, as the user's labels are written (``data.classes`` as a list,
        ``data.labels = "map"``); None for a model that is not a classifier."""
        if self.classes is None or predictions.shape[-1:] != (self.classes,):
            return None
        return decode(predictions.argmax(axis=-1).astype(np.int32), self.job.data.labels)

    def _batch(self, x: np.ndarray) -> np.ndarray:
        if not self.job.model.tables:
            return np.asarray(self._predict(self.params, x))
        used = self.job.model.ids(x)
        blocks = rows_of(self.job, self._tables, {name: unique_ids([used[name]]) for name in self.job.model.tables})
        return np.asarray(self._predict(self.params, padded_rows(blocks), positions(blocks, used), x))


@functools.lru_cache(maxsize=8)
def _jitted(predict: Any, tables: bool) -> Any:
    if not tables:
        return jax.jit(predict)

    def looked_up(params: Any, rows: dict, inverse: dict, x: jax.Array) -> jax.Array:
        return predict(params, x, {name: jnp.take(block, inverse[name], axis=0) for name, block in rows.items()})

    return jax.jit(looked_up)


def load_model(
    run_dir: str | Path,
    step: int | str | None = None,
    config: Config | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainedModel:
    """The model a run trained, with its parameters, ready to predict. A table
    model's rows come from the checkpoint of the step the parameters are of.

    Args:
        run_dir: the run folder.
        step: a checkpoint's parameters instead of the final ones (``"best"``: the
            best evaluation's, kept by ``train.keep_best``).
        config: the model and data to use (default: the run's own ``config.json``).
        checkpoint_dir: where the shards of a cluster run kept their checkpoints
            (default: the run folder's).

    Returns:
        A ``TrainedModel``.

    Raises:
        UsageError: the run lacks what is asked for, its labels are not the data's
            now, or the model defines no ``predict``; in one line.

    Example::

        model = psfw.load_model("runs/run-001")
        probabilities = model.predict(x)
    """
    run_dir = Path(run_dir)
    job = build_job(config if config is not None else run_config(run_dir))
    check_labels(run_dir, job)
    at, values = trained_values(run_dir, job, step, checkpoint_folder(run_dir, checkpoint_dir))
    tables = {name: load_table(run_dir, name, step or at, checkpoint_dir) for name in job.model.tables}
    return TrainedModel(job, at, values, tables)


def _checked_rows(job: Job, x: Any, what: str) -> Any:
    """``x`` when its rows have the shape of the training inputs, else UsageError."""
    want = tuple(job.data.input_shape)
    shape = tuple(getattr(x, "shape", np.shape(x)))
    if shape[1:] != want:
        raise UsageError(
            f"{what} has rows of shape {list(shape[1:])}, but the model was trained on rows of shape {list(want)} "
            f"({job.config.source})"
        )
    kind = np.dtype(getattr(x, "dtype", np.asarray(x[:1]).dtype)).kind
    if (kind in "iub") != (np.dtype(job.data.x_train.dtype).kind in "iub"):
        raise UsageError(f"{what} holds {kind!r}-kind values, but the model was trained on {job.data.x_train.dtype}")
    return x


def generate(model: TrainedModel, prompt: bytes, length: int, temperature: float = 1.0, seed: int = 0) -> bytes:
    """``length`` bytes that a byte-level language model writes after ``prompt``,
    one at a time: each drawn from the model's next-byte distribution sharpened by
    ``temperature`` (0: always the most probable), the model seeing the last
    ``seq_len`` bytes."""
    job = model.job
    shape = tuple(job.data.input_shape)
    if job.data.classes != 256 or len(shape) != 1 or tuple(job.data.label_shape) != shape:
        raise UsageError(
            f"{job.config.source}: psfw generate needs a byte-level language model (rows of bytes labelled by "
            "the next bytes, 256 classes), such as examples/lm.toml"
        )
    if not prompt:
        raise UsageError("--prompt is empty: give the text to go on from")
    if temperature < 0:
        raise UsageError(f"--temperature {temperature}: give 0 (the most probable byte) or more")
    window = shape[0]
    rng = np.random.default_rng(seed)
    tokens = list(prompt)
    x = np.zeros((1, window), job.data.x_train.dtype)
    for _ in range(length):
        seen = tokens[-window:]
        x[0, :] = 0
        x[0, : len(seen)] = seen  # later positions do not reach earlier ones (causal): padding is harmless
        probs = np.asarray(model._predict(model.params, x), np.float64)[0, len(seen) - 1]
        if temperature == 0:
            tokens.append(int(probs.argmax()))
            continue
        weights = np.exp(np.log(np.maximum(probs, 1e-30)) / temperature)
        tokens.append(int(rng.choice(len(weights), p=weights / weights.sum())))
    return bytes(tokens[len(prompt) :])


def write_predictions(output: Path, predictions: np.ndarray, classes: np.ndarray | None) -> list[Path]:
    """Write ``predictions`` (and a classifier's ``classes``) to ``output``: one
    ``.npz`` file with both arrays, or a ``.npy`` file and, for the classes,
    ``<name>-class.npy`` beside it. Returns the files written."""
    if output.suffix not in (".npy", ".npz"):
        raise UsageError(f"--output {output}: give a .npy or an .npz file name")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".npz":
            arrays = {"predictions": predictions} | ({} if classes is None else {"class": classes})
            np.savez(output, **arrays)
            return [output]
        np.save(output, predictions)
        if classes is None:
            return [output]
        beside = output.with_name(f"{output.stem}-class.npy")
        np.save(beside, classes)
        return [output, beside]
    except OSError as err:
        raise UsageError(f"--output {output} cannot be written: {err.strerror or err}") from None
