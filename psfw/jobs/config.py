"""The job config: a TOML file validated on load.

Unknown keys, wrong types and impossible topologies are ConfigErrors whose one-line
message names the file, the field and the problem (``job.toml: cluster.servers:
...``), before anything starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from psfw.base.errors import ConfigError
from psfw.jobs.cluster_config import ClusterConfig
from psfw.jobs.config_checks import check_seed
from psfw.jobs.optimizer_config import OptimizerConfig, ScheduleConfig, TablesConfig, _FieldError, _Strict
from psfw.jobs.overrides import apply_overrides
from psfw.jobs.ray_config import RayConfig

__all__ = ["Config", "OptimizerConfig", "ScheduleConfig", "TablesConfig", "load_config", "parse_config"]


# the keys each model uses, beside name
MODEL_KEYS = {
    "mlp": ("hidden",),
    "cnn": ("channels",),
    "transformer": ("width", "heads", "depth", "ff"),
    "fm": ("dim", "scale"),
    "custom": ("path", "options"),
}


def _applies(key: str, users: dict[str, tuple[str, ...]], what: str) -> str:
    """``applies to mlp only``: the problem of a key the chosen entry does not use."""
    names = [name for name, keys in users.items() if key in keys]
    if not names:
        return "applies to no other choice"
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"applies to {listed} {what} only"


class ModelConfig(_Strict):
    name: Literal[tuple(MODEL_KEYS)] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128])
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    width: int = Field(128, ge=1)  # transformer: model width (embedding size)
    heads: int = Field(4, ge=1)  # transformer: attention heads; width must be a multiple
    depth: int = Field(2, ge=1)  # transformer: blocks
    ff: int = Field(4, ge=1)  # transformer: hidden width of the feed-forward part, in widths
    dim: int = Field(16, ge=1)  # fm: latent values per id (a table row holds them and the id's bias)
    scale: float = Field(0.01, ge=0, allow_inf_nan=False)  # fm: deviation of the rows' initial values
    path: str | None = None  # custom: a .py file with init(key) and loss(params, x, y)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("layer sizes must be at least 1")
        return sizes

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.name == "custom" and not self.path:
            raise _FieldError("path", "a custom model needs path = 'file.py' (a file with init and loss)")
        if self.name == "transformer" and self.width % self.heads:
            raise _FieldError("width", f"{self.width} must be a multiple of model.heads ({self.heads})")
        # a key the chosen model does not use would be ignored without a word
        for key in sorted(self.model_fields_set - set(MODEL_KEYS[self.name]) - {"name"}):
            raise _FieldError(key, f"{_applies(key, MODEL_KEYS, 'models')}, not to {self.name}: drop it")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """The model's keys for config.json: the transformer's only for the
        transformer, the others always (earlier runs' config.json holds them)."""
        data = handler(self)
        for model in ("transformer", "fm"):  # the other models' keys stay, as earlier runs' config.json holds them
            if self.name != model:
                for key in MODEL_KEYS[model]:
                    data.pop(key)
        return data


SYNTHETIC_ONLY = ("features", "classes", "train", "test")
# the keys each source of data uses, beside name (path and module: a user's data)
DATA_KEYS = {
    "digits": (),
    "diabetes": (),
    "stdlib_text": ("seq_len",),
    "synthetic": SYNTHETIC_ONLY,
    "clicks": ("users", "items", "train", "test", "alpha"),
    "path": ("path", "classes", "labels", "standardize_y", "test_fraction"),
    "module": ("module", "options", "classes", "labels", "standardize_y", "test_fraction"),
}


class DataConfig(_Strict):
    name: Literal["digits", "diabetes", "stdlib_text", "synthetic", "clicks"] = "digits"
    path: str | None = None  # an .npz file or a folder of .npy files (relative to the config)
    module: str | None = None  # a .py file whose load(**options) returns the arrays
    options: dict[str, Any] = Field(default_factory=dict)  # module: load's keyword arguments
    # classification: the number of classes (labels 0..classes-1), or the label values in
    # class order (["setosa", "versicolor", "virginica"]); unset: the labels are targets
    classes: Annotated[int, Field(ge=2)] | Annotated[list[str | int], Field(min_length=2)] | None = None
    labels: Literal["map"] | None = None  # path, module: the classes are the training labels' values
    standardize_y: bool = False  # path, module: a regression's targets less the training mean, over its deviation
    test_fraction: float = Field(0.2, gt=0, lt=1)  # path, module: held out when no x_test is given
    seq_len: int = Field(128, ge=1)  # stdlib_text: bytes per row
    features: int = Field(784, ge=1)  # synthetic only, as the two below and classes
    train: int | None = Field(None, ge=1)  # synthetic and clicks: training rows (8192; clicks 3,000,000)
    test: int | None = Field(None, ge=1)  # test rows (1024; clicks 50,000)
    users: int = Field(10_000, ge=1)  # clicks: user ids
    items: int = Field(1_000, ge=1)  # clicks: item ids
    alpha: float = Field(1.2, gt=1, le=10, allow_inf_nan=False)  # clicks: the ids' Zipf exponent

    @property
    def source(self) -> str:
        """Where the data comes from: ``path``, ``module`` or a shipped set's name."""
        return "path" if self.path else "module" if self.module else self.name

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.path and self.module:
            raise _FieldError("module", "give data.path or data.module, not both")
        if self.source in ("path", "module") and "name" in self.model_fields_set:
            raise _FieldError(self.source, f"give data.name (a shipped set) or data.{self.source}, not both")
        for key in sorted(self.model_fields_set - set(DATA_KEYS[self.source]) - {"name"}):
            raise _FieldError(key, f"{_applies(key, DATA_KEYS, 'data')}, not to {self.source}: drop it")
        if isinstance(self.classes, list) and self.source == "synthetic":
            raise _FieldError("classes", "synthetic data has classes 0..N-1: give their number")
        if self.labels is not None and self.classes is not None:
            raise _FieldError(
                "labels", 'give data.classes (a number, or the label values) or data.labels = "map", not both'
            )
        if self.standardize_y and (self.classes is not None or self.labels is not None):
            raise _FieldError("standardize_y", "is for a regression's targets, not for class labels: drop it")
        return self

    @property
    def rows(self) -> tuple[int, int]:
        """Training and test rows of a generated set (synthetic, clicks)."""
        train, test = (3_000_000, 50_000) if self.name == "clicks" else (8192, 1024)
        return (self.train or train, self.test or test)

    @property
    def classification_classes(self) -> int | None:
        """The classes the config gives (synthetic: 10 unless set)."""
        return (self.classes or 10) if self.source == "synthetic" else self.classes

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """Only the keys that describe the data set (config.json, the job identity)."""
        data = handler(self)
        keys = DATA_KEYS[self.source]
        out = {"name": data["name"]} if self.source == self.name else {}
        out.update({k: data[k] for k in keys})
        if self.source in ("synthetic", "clicks"):
            out["train"], out["test"] = self.rows
        if self.source == "synthetic":
            out["classes"] = self.classification_classes
        return out


class TrainConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # evaluate on the test split every N steps of group 0 (0: at the end only)
    eval_batch_size: int = Field(256, ge=1)  # test rows per evaluation call
    wait_s: float = Field(120.0, gt=0)  # longest wait for a group, a Get or a Put
    checkpoint_every: int = Field(0, ge=0)  # consistent shard checkpoints every N steps of group 0 (0: never)
    retries: int = Field(5, ge=0)  # retries of an RPC that found its shard UNAVAILABLE
    # keep the checkpoint of the best evaluation apart from the rotation, by this
    # recorded metric ("test_accuracy", "test_loss", ...); best_mode: max or min
    # (default: min for a loss, else max)
    keep_best: str | None = None
    best_mode: Literal["max", "min"] | None = None
    stop_after: int | None = Field(None, ge=1)  # stop when keep_best's metric has not improved for N evaluations

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise _FieldError("epochs", "give train.steps or train.epochs, not both")
        if self.stop_after is not None and self.keep_best is None:
            raise _FieldError("stop_after", "counts evaluations without a better train.keep_best: set keep_best too")
        if self.best_mode is not None and self.keep_best is None:
            raise _FieldError("best_mode", "says which way train.keep_best's metric is better: set keep_best too")
        if self.keep_best is not None and (
            not self.eval_every or not self.checkpoint_every or self.eval_every % self.checkpoint_every
        ):
            raise _FieldError(
                "keep_best",
                "keeps the checkpoint of the best evaluation, so the evaluations must fall on checkpoints: set "
                f"train.eval_every to a multiple of train.checkpoint_every (now {self.eval_every} and "
                f"{self.checkpoint_every})",
            )
        return self


class Config(_Strict):
    """A job: its model, data, training, optimizer, embedding tables and cluster, as
    a TOML config says them (every key: docs/configuration.md).

    Made by ``load_config`` (or ``parse_config`` from a dict); immutable, validated
    as a whole: an unknown key or a value out of range is a ConfigError naming it.

    Attributes:
        name: the job's name (default: the config file's stem), in its identity.
        seed: the seed of initialization and data order.
        model, data, train, optimizer, tables, cluster, ray: the config's sections.
        base_dir: where relative paths in the config resolve (set by ``load_config``).
        source: what errors name: the file (set by ``load_config``).
        overrides: the ``--set KEY=VALUE`` items applied (set by ``load_config``).
    """

    name: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:+-]+$")
    seed: Annotated[int, AfterValidator(check_seed)] = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    tables: TablesConfig | None = None  # a model with embedding tables: their optimizer (unset: adagrad, lr 0.05)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    ray: RayConfig = Field(default_factory=RayConfig)  # psfw ray only
    base_dir: str = "."  # where relative paths in the config resolve; set by load_config
    source: str = "config"  # what errors name (the file); set by load_config
    overrides: list[str] = Field(default_factory=list)  # the --set KEY=VALUE applied; set by load_config

    @model_validator(mode="after")
    def _check(self) -> Config:
        c = self.cluster
        if c.group_timeout_s is not None and c.staleness is not None and c.group_timeout_s >= self.train.wait_s:
            raise _FieldError(
                "cluster.group_timeout_s",
                f"{c.group_timeout_s:g} s is not shorter than train.wait_s ({self.train.wait_s:g} s): a group held "
                "for one that left would fail first: lower it, or raise train.wait_s",
            )
        if self.train.batch_size < self.cluster.workers_per_group:
            raise _FieldError(
                "train.batch_size",
                f"{self.train.batch_size} is smaller than cluster.workers_per_group "
                f"({self.cluster.workers_per_group}): every worker needs at least one row",
            )
        return self

    def set_flags(self) -> list[str]:
        """The overrides this config was loaded with, as command-line flags again
        (``["--set", "train.epochs=5", ...]``): the same job in another OS process."""
        return [flag for item in self.overrides for flag in ("--set", item)]

    def error(self, field: str, problem: str) -> ConfigError:
        """A ConfigError found after validation (data, model, layout), in the same
        form as a validation error: ``job.toml: model.path: ...``."""
        return ConfigError(f"{self.source}: {field}: {problem}")


SET_BY_LOADER = ("base_dir", "source", "overrides")


def _field(loc: list[Any]) -> str:
    """``["model", "hidden", 0]`` -> ``model.hidden[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _one_line(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = list(e["loc"])
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            loc += cause.field.split(".")
        where = _field(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the config reference)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{where}: {msg}" if where else msg)
    return f"{source}: " + "; ".join(parts)


def parse_config(data: dict[str, Any], source: str = "config", base_dir: str = ".") -> Config:
    """Validate a config given as a dict (what a TOML file parses to); ``source``
    (the file) leads every error message, also those found later (Config.error)."""
    try:
        return Config.model_validate({**data, "base_dir": base_dir, "source": source})
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read and validate a job's TOML config.

    Args:
        path: the TOML file; relative paths inside it resolve from its folder.
        overrides: ``KEY=VALUE`` items applied before validation, as ``--set`` does
            (``["train.epochs=5"]``; see ``psfw.jobs.overrides``).

    Returns:
        The validated ``Config``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a key or value is
            wrong; the one-line message names the file, the key and the problem.

    Example::

        config = psfw.load_config("examples/digits_mlp.toml", ["train.epochs=5"])
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder: give a TOML config file (e.g. examples/digits_mlp.toml)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file: give a TOML config") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for key in SET_BY_LOADER:
        if key in data:
            raise ConfigError(f"{path}: {key}: unknown key (check its spelling against the config reference)")
    if overrides:
        data = apply_overrides(data, overrides, Config, SET_BY_LOADER)
    config = parse_config(data, str(path), str(path.parent.resolve()))
    return config.model_copy(update={"overrides": list(overrides or [])})
