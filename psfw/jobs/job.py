"""A config resolved into the things that run: model, data, steps and layout."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from psfw.base.identity import job_identity
from psfw.compute.batching import BatchOrder
from psfw.compute.datasets import Dataset, load_dataset
from psfw.compute.models import Model, cnn, head_for, load_user_model, mlp
from psfw.compute.netgraph import check_layers
from psfw.compute.tables import check_ids, check_table, check_table_optimizer, rows_by_shard, unique_ids
from psfw.compute.user_data import check_dataset, load_module, load_path, value_range
from psfw.jobs.checks import check_gradient, check_loss_output, check_memory, check_parameters, check_table_ids
from psfw.jobs.checks import model_field as _model_field
from psfw.jobs.config import Config, TablesConfig
from psfw.protocol.layout import Layout, plan_layout
from psfw.runtime.connect import shard_ranges
from psfw.runtime.table_feed import TableFeed

log = logging.getLogger("psfw")


@dataclass
class Job:
    config: Config
    model: Model
    data: Dataset
    layout: Layout
    treedef: Any
    steps: int

    def order(self, group: int) -> BatchOrder:
        """The data order of ``group``: each group shuffles every epoch its own way."""
        return BatchOrder(len(self.data.x_train), self.config.train.batch_size, self.config.seed, group)

    def table_declaration(self) -> dict[str, Any]:
        """The model's embedding tables as the shards take them (JSON): each one's
        rows, width, initial values, row-wise optimizer, the seed of its rows, and
        how long its rows live where that is not for ever."""
        settings = self.config.tables or TablesConfig()
        default = settings.optimizer.spec()
        return {
            name: {
                **spec.describe(),
                "optimizer": check_table_optimizer(spec.optimizer) if spec.optimizer else default,
                "seed": self.config.seed,
                "materialize": settings.materialize and spec.rows is not None,
                **settings.lifetime(name).declared(),
            }
            for name, spec in self.model.tables.items()
        }

    def identity(self) -> dict[str, Any]:
        """The job's identity (psfw.base.identity), tables included."""
        params = {n: (p.dtype, p.shape) for n, p in self.layout.params.items()}
        # when the rows are made is not part of what is trained
        tables = {n: {k: v for k, v in t.items() if k != "materialize"} for n, t in self.table_declaration().items()}
        return job_identity(self.config, params, tables or None)

    def batch_ids(self, group: int, workers: list[int]) -> Callable[[int], dict[str, np.ndarray]]:
        """``ids(step)``: the table ids the sub-batches of ``workers`` of ``group`` use
        at a step, by table (the rows' ids, concatenated)."""
        order, ids_of, wpg = self.order(group), self.model.ids, self.config.cluster.workers_per_group

        def ids(step: int) -> dict[str, np.ndarray]:
            used = [ids_of(np.asarray(self.data.x_train[order.worker_indices(step, w, wpg)])) for w in workers]
            return {name: np.concatenate([np.asarray(u[name]).reshape(-1) for u in used]) for name in used[0]}

        return ids

    def table_feed(self, group: int, workers: list[int], evaluates: bool) -> TableFeed:
        """The table rows a worker process of ``group`` with ``workers`` needs each
        step; the worker process that ``evaluates`` also gets the test split's rows at the steps
        its evaluation comes due (every ``train.eval_every``)."""
        every = self.config.train.eval_every
        return TableFeed(
            self.model.tables,
            self.batch_ids(group, workers),
            self.config.cluster.servers,
            self.steps,
            self.table_declaration(),
            extra=self.test_ids() if evaluates and every else None,
            extra_due=lambda step: step % every == 0 and step < self.steps,
        )

    def test_ids(self) -> dict[str, np.ndarray]:
        """Every table id the test split uses (its rows are pulled for an evaluation)."""
        x = self.data.x_test
        batch = max(self.config.train.eval_batch_size, 4096)
        parts = [self.model.ids(np.asarray(x[i : i + batch])) for i in range(0, len(x), batch)]
        return {name: unique_ids([p[name] for p in parts]) for name in self.model.tables}


def _resolve(config: Config, path: str) -> Path:
    """A path of the config, relative to the config file's folder."""
    found = Path(path).expanduser()
    return found if found.is_absolute() else Path(config.base_dir) / found


def _data_named(config: Config) -> str:
    """``data.name digits``, ``data.path big``: the data, as the config names it."""
    d = config.data
    return f"data.{d.source} {getattr(d, d.source)}" if d.source in ("path", "module") else f"data.name {d.name}"


def load_data(config: Config) -> Dataset:
    """The config's data set, checked (``check_dataset``); ConfigError naming the
    config, the field and the file when it cannot train."""
    d = config.data
    field = {"path": "data.path", "module": "data.module"}.get(d.source, "data.name")
    labels = {"labels": d.labels, "standardize_y": d.standardize_y}
    try:
        if d.source == "path":
            return load_path(_resolve(config, d.path), d.classes, d.test_fraction, config.seed, **labels)
        if d.source == "module":
            return load_module(_resolve(config, d.module), d.options, d.classes, d.test_fraction, config.seed, **labels)
        options: dict[str, Any] = {}
        if d.name == "synthetic":
            train, test = d.rows
            options = dict(features=d.features, classes=d.classification_classes, train=train, test=test)
            options["seed"] = config.seed
        elif d.name == "clicks":
            train, test = d.rows
            options = dict(users=d.users, items=d.items, train=train, test=test, alpha=d.alpha, seed=config.seed)
        elif d.name == "stdlib_text":
            options["seq_len"] = d.seq_len
        image = d.name == "digits" and config.model.name == "cnn"  # digits come as 8x8 images too
        data = load_dataset(d.name, image=image, **options)
        check_dataset(data, d.name)
        return data
    except ValueError as err:
        raise config.error(field, str(err)) from None


def build_model(config: Config, data: Dataset) -> Model:
    m = config.model
    if m.name in ("mlp", "cnn"):
        if data.classes is None and data.y_train.dtype.kind in "iu":
            raise config.error(
                "data.classes",
                f"the labels are integers ({data.y_train.dtype}) but no classes are given: set data.classes for "
                "classification, or store float labels to train a regression",
            )
        if data.classes is not None and data.label_shape not in ((), (1,)):
            raise config.error(
                "model.name",
                f"{m.name} gives one class per row, but the labels have the shape {list(data.label_shape)} per row: "
                "use a model for sequences (transformer) or your own",
            )
        outputs, head, head_name, output = head_for(data.classes, data.label_shape)
    if m.name == "mlp":
        return mlp([math.prod(data.input_shape), *m.hidden, outputs], head, head_name, output)
    if m.name == "cnn":
        if len(data.input_shape) != 3:
            raise config.error(
                "model.name", f"cnn needs image data (H, W, C), {_data_named(config)} has {data.input_shape}"
            )
        return cnn(data.input_shape, outputs, m.channels, head, head_name, output)
    if m.name == "transformer":
        if data.classes is None or len(data.input_shape) != 1 or data.label_shape != data.input_shape:
            raise config.error(
                "model.name",
                f"transformer needs token sequences (rows of ids, labelled by the next ids) and data.classes "
                f"(the vocabulary), but the inputs are {list(data.input_shape)} and the labels "
                f"{list(data.label_shape)} per row with classes {data.classes}",
            )
        if data.x_train.dtype.kind not in "iu":
            raise config.error(
                "model.name", f"transformer needs integer token ids, but x_train is {data.x_train.dtype}"
            )
        for name in ("x_train", "x_test"):  # JAX would clamp an id out of range without a word
            low, high = value_range(getattr(data, name))
            if low < 0 or high >= data.classes:
                raise config.error(
                    "data.classes",
                    f"{name} holds token ids from {low} to {high}, out of range for a vocabulary of {data.classes}",
                )
        from psfw.compute.transformer import transformer_lm

        return transformer_lm(data.classes, data.input_shape[0], m.width, m.heads, m.depth, m.ff)
    if m.name == "fm":
        return _factorization_machine(config, data)
    path = _resolve(config, m.path)
    try:
        return load_user_model(path, **m.options)
    except ValueError as err:
        raise config.error("model.path", str(err)) from None


def declares_tables(config: Config) -> bool:
    """Whether the config's model keeps embedding tables (known without its data:
    ``psfw launch`` gives the shards a checkpoint folder then, as the tables live
    nowhere else)."""
    m = config.model
    if m.name == "fm":
        return True
    if m.name != "custom":
        return False
    try:
        return bool(load_user_model(_resolve(config, m.path), **m.options).tables)
    except ValueError as err:
        raise config.error("model.path", str(err)) from None


def _factorization_machine(config: Config, data: Dataset) -> Model:
    """A factorization machine over the (user id, item id) rows of ``data``, with a
    table row per id up to the largest id either split holds."""
    if data.x_train.dtype.kind not in "iu" or data.input_shape != (2,):
        raise config.error(
            "model.name",
            f"fm needs rows of two integer ids (user, item), {_data_named(config)} has {data.x_train.dtype}"
            f"{list(data.input_shape)}",
        )
    d = config.data
    if d.source == "clicks":
        users, items = d.users, d.items
    else:
        highs = [value_range(x)[1] for x in (data.x_train, data.x_test)]
        users = items = max(highs) + 1  # the columns' own ranges would need a pass each
    from psfw.compute.recsys import factorization_machine

    return factorization_machine(users, items, config.model.dim, config.model.scale)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_model(config: Config, model: Model, data: Dataset) -> Any:
    """The shapes of the model's parameters, once its init and its loss ran on one
    batch's shapes (``jax.eval_shape``: no numbers computed); ConfigError in one line
    when they do not fit the data, instead of a JAX traceback at the first step."""
    try:
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(config.seed))
    except Exception as err:
        raise config.error(_model_field(config), f"init(key) failed: {_first_line(err)}") from None
    check_parameters(config, _model_field(config), shapes)  # by name, before the loss meets a leaf it cannot take
    rows = min(config.train.batch_size, len(data.x_train))
    x, y = data.x_train[:rows], data.y_train[:rows]
    seen = f"x is {x.dtype}{list(x.shape)} and y {y.dtype}{list(y.shape)} for a batch of {rows}"
    inputs = (shapes, x, y, *_embedded(config, model, np.asarray(x)))
    try:
        out = jax.eval_shape(model.loss, *inputs)
    except Exception as err:
        raise config.error(
            _model_field(config), f"the model does not fit the data ({seen}): {_first_line(err)}"
        ) from None
    check_loss_output(config, _model_field(config), out, seen)
    check_gradient(config, _model_field(config), model.loss, inputs, bool(model.tables))
    return shapes


def _embedded(config: Config, model: Model, x: np.ndarray) -> tuple[dict[str, Any], ...]:
    """A table model's looked-up rows for ``x``, as shapes (the loss's last
    argument); ConfigError when its tables or ids are wrong. No tables: ()."""
    if not model.tables:
        return ()
    field = _model_field(config)
    if model.ids is None:
        raise config.error(field, "the model declares embedding tables but no ids(x) naming the rows each row uses")
    try:  # the declaration alone: no batch involved
        for name, spec in model.tables.items():
            check_table(name, spec)
            if spec.optimizer is not None:
                check_table_optimizer(spec.optimizer)
    except ValueError as err:
        raise config.error(field, str(err)) from None
    for name in sorted(set(config.tables.per_table) - set(model.tables)) if config.tables else []:
        raise config.error(
            f"tables.per_table.{name}", f"the model has no table {name!r} (it has {', '.join(model.tables)})"
        )
    try:
        used = model.ids(x)
        missing = sorted(set(model.tables) - set(used))
        if missing:
            raise ValueError(f"ids(x) gives no ids of the tables {missing}")
        ids = {name: check_ids(name, used[name], spec) for name, spec in model.tables.items()}
    except ValueError as err:
        raise config.error(field, f"{err} (in the first training batch)") from None
    return ({n: jax.ShapeDtypeStruct((*ids[n].shape, s.dim), np.float32) for n, s in model.tables.items()},)


def _check_predict(config: Config, model: Model, data: Dataset, shapes: Any) -> None:
    """A model's ``predict``, run on one batch's shapes as the loss is: ConfigError
    in one line when it does not take them or gives no array."""
    if model.predict is None:
        return
    rows = min(config.train.batch_size, len(data.x_train))
    x = data.x_train[:rows]
    try:
        out = jax.eval_shape(model.predict, shapes, x, *_embedded(config, model, np.asarray(x)))
    except Exception as err:
        raise config.error(
            _model_field(config), f"predict(params, x) fails on a batch of {x.dtype}{list(x.shape)}: {_first_line(err)}"
        ) from None
    if getattr(out, "shape", ())[:1] != (rows,):
        raise config.error(
            _model_field(config),
            f"predict(params, x) must give one answer per row (an array of {rows} rows for a batch of {rows}), "
            f"not {out}",
        )


def _check_keep_best(config: Config, model: Model, data: Dataset, shapes: Any) -> None:
    """``train.keep_best`` names a metric the evaluations record: ``test_loss``, or
    ``test_<name>`` of a metric the loss returns (``test_auc`` with a score)."""
    name = config.train.keep_best
    if name is None:
        return
    rows = min(config.train.batch_size, len(data.x_train))
    x, y = data.x_train[:rows], data.y_train[:rows]
    _, metrics = jax.eval_shape(model.loss, shapes, x, y, *_embedded(config, model, np.asarray(x)))
    recorded = ["test_loss", *(f"test_{m}" for m in metrics), *(["test_auc"] if model.score is not None else [])]
    if name not in recorded:
        raise config.error("train.keep_best", f"{name!r} is no metric the evaluations record: use one of {recorded}")


def _check_has_parameters(config: Config, model: Model, flat: dict[str, Any]) -> None:
    """ConfigError when the model has nothing to train: no parameter from ``init``
    and no embedding table (the shards would hold nothing, the workers wait forever)."""
    if not flat and not model.tables:
        raise config.error(
            _model_field(config),
            "the model has no parameters: init(key) returned no arrays and it declares no tables; "
            "return the parameters to train from init, or declare embedding tables",
        )


def build_job(config: Config) -> Job:
    """Load the data, build the model and plan the layout; ConfigError (naming the
    config file and the field) when they cannot work together."""
    data = load_data(config)
    batch = config.train.batch_size
    if batch > len(data.x_train):
        raise config.error(
            "train.batch_size",
            f"{batch} is larger than the {len(data.x_train)} training rows of {_data_named(config)}: "
            "lower it, or give more rows",
        )
    model = build_model(config, data)
    if config.tables is not None and not model.tables:
        raise config.error("tables", f"{_model_field(config)} declares no embedding tables: drop [tables]")
    shapes_tree = _check_model(config, model, data)
    _check_predict(config, model, data, shapes_tree)
    _check_keep_best(config, model, data, shapes_tree)
    check_table_ids(config, model, data)  # every row's ids, before a batch reaches a bad one
    flat, treedef = check_parameters(config, _model_field(config), shapes_tree)
    check_memory(config, _model_field(config), flat, shards_here=False)  # a worker process holds them all
    _check_has_parameters(config, model, flat)
    try:  # here, not when net.json is written at the end of training
        model = model._replace(layers=check_layers(model.layers, list(flat)))
    except ValueError as err:
        raise config.error(_model_field(config), str(err)) from None
    shapes = {n: (tuple(s.shape), str(s.dtype)) for n, s in flat.items()}
    c = config.cluster
    layout = plan_layout(shapes, c.servers, c.workers_per_group, c.slice_bytes)
    order = BatchOrder(len(data.x_train), batch, config.seed)
    t = config.train
    steps = t.steps if t.steps is not None else (t.epochs or 1) * order.steps_per_epoch
    if c.warmup_steps >= steps and c.worker_groups > 1:
        raise config.error(
            "cluster.warmup_steps",
            f"{c.warmup_steps} warmup steps leave nothing of the {steps} steps to the other groups",
        )
    return Job(config, model, data, layout, treedef, steps)


def warn_empty_shards(job: Job) -> None:
    """Warn of shards that hold neither a dense slice nor a table row: they only slow
    every step down. A table's rows are spread over the shards by id (an unbounded
    table's: over every shard)."""
    c = job.config.cluster
    used = {s.shard for p in job.layout.params.values() for s in p.slices}
    for name, spec in job.model.tables.items():
        counts = rows_by_shard(name, spec.rows, c.servers) if spec.rows is not None else None
        used.update(range(c.servers) if counts is None else [i for i, n in enumerate(counts) if n])
    empty = [i for i in range(c.servers) if i not in used]
    if empty:
        rows = sum(spec.rows for spec in job.model.tables.values())
        log.warning(
            "%s: cluster.servers is %d but the model has only %d slices%s: %s %s nothing and only slow every step "
            "down (lower cluster.servers, or cluster.slice_bytes to cut the parameters finer)",
            job.config.source,
            c.servers,
            sum(len(p.slices) for p in job.layout.params.values()),
            f" and {rows} table rows" if rows else "",
            shard_ranges(empty),
            "holds" if len(empty) == 1 else "hold",
        )
