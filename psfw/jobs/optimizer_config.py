"""The optimizer sections of a job's config: ``[optimizer]`` (the dense parameters:
optax, on the shards) and ``[tables]`` (embedding tables: row-wise, on the shards).

The bounds are psfw.compute's, the ones the shards check again; a config breaking
them is refused on load, naming the field. ``_Strict`` and ``_FieldError`` are the
config's own base and cross-field error (psfw.jobs.config uses them too).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from psfw.compute.optimizer_schema import FIELDS, OPTIMIZERS, SCHEDULE_FIELDS, SCHEDULES, SpecError, check_spec
from psfw.compute.tables import BIAS_CORRECTIONS, TABLE_OPTIMIZERS, check_table_optimizer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _FieldError(ValueError):
    """A check across fields, reported under ``field`` (a dotted path inside the
    model that raises it), so the one-line message names the field to change."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


class _Finite(_Strict):
    # the shards refuse an infinite hyperparameter (psfw.compute.optimizers): so does the config, first
    model_config = ConfigDict(allow_inf_nan=False)


class ScheduleConfig(_Finite):
    # defaults and bounds: psfw.compute.optimizer_schema, checked by OptimizerConfig
    name: Literal[SCHEDULES] = "constant"
    steps: int = SCHEDULE_FIELDS["steps"].default
    warmup_steps: int = SCHEDULE_FIELDS["warmup_steps"].default
    end_value: float = SCHEDULE_FIELDS["end_value"].default
    decay_rate: float = SCHEDULE_FIELDS["decay_rate"].default
    transition_steps: int = SCHEDULE_FIELDS["transition_steps"].default


class OptimizerConfig(_Finite):
    # defaults and bounds: psfw.compute.optimizer_schema, the one the shards check too
    name: Literal[OPTIMIZERS] = "sgd"
    learning_rate: float = FIELDS["learning_rate"].default
    momentum: float = FIELDS["momentum"].default
    b1: float = FIELDS["b1"].default
    b2: float = FIELDS["b2"].default
    eps: float = FIELDS["eps"].default
    decay: float = FIELDS["decay"].default
    initial_accumulator_value: float = FIELDS["initial_accumulator_value"].default
    weight_decay: float = FIELDS["weight_decay"].default
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        try:
            check_spec(self.model_dump())
        except SpecError as err:
            raise _FieldError(err.field, err.problem) from None
        return self

    def spec_json(self) -> str:
        """The spec the shards build their optimizer from."""
        return json.dumps(self.model_dump(), sort_keys=True)


class TableOptimizerConfig(_Finite):
    """The row-wise optimizer of a model's embedding tables (psfw.compute.tables:
    sgd, adagrad or lazy adam; a table may name its own)."""

    name: Literal[TABLE_OPTIMIZERS] = "adagrad"
    learning_rate: float = 0.05
    initial_accumulator_value: float = FIELDS["initial_accumulator_value"].default  # adagrad
    b1: float = FIELDS["b1"].default  # adam
    b2: float = FIELDS["b2"].default
    eps: float | None = None  # adagrad 1e-7, adam 1e-8
    bias_correction: Literal[BIAS_CORRECTIONS] = "per_row"  # adam: each row's own updates, or the table's

    @model_validator(mode="after")
    def _check(self) -> TableOptimizerConfig:
        if self.bias_correction != "per_row" and self.name != "adam":  # a stored config.json holds the default
            raise _FieldError("bias_correction", f"applies to adam only, not to {self.name}: drop it")
        try:
            check_table_optimizer(self.spec())
        except SpecError as err:
            raise _FieldError(err.field, err.problem) from None
        return self

    def spec(self) -> dict[str, Any]:
        """The checked spec the shards build the optimizer from (only its own fields)."""
        keys = {"sgd": (), "adagrad": ("initial_accumulator_value", "eps"), "adam": ("b1", "b2", "eps")}[self.name]
        spec = {"name": self.name, "learning_rate": self.learning_rate}
        spec.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        if self.name == "adam":
            spec["bias_correction"] = self.bias_correction
        return check_table_optimizer(spec)


class TableLifetimeConfig(_Strict):
    """How long a table's rows live on the shards (see psfw.services.table_lifetime):
    the defaults make a row at an id's first step and keep it for ever."""

    # an id gets a row at the admit_after-th step whose batches use it; until then its
    # lookup gives zeros and its gradient is dropped
    admit_after: int = Field(1, ge=1)
    # a row untouched for this many steps goes, with its optimizer state (0: never)
    expire_after: int = Field(0, ge=0)
    # at most this many rows over all shards (each shard: max_rows / servers, rounded
    # up); past it the least recently used go (0: no cap)
    max_rows: int = Field(0, ge=0)

    def declared(self) -> dict[str, int]:
        """The rules as a table's declaration carries them: only where they are not
        the defaults."""
        return {k: v for k, v in self.model_dump().items() if v != TableLifetimeConfig.model_fields[k].default}


class TableLifetimeOverride(_Strict):
    """One table's own rules (unset: the ``[tables]`` section's)."""

    admit_after: int | None = Field(None, ge=1)
    expire_after: int | None = Field(None, ge=0)
    max_rows: int | None = Field(None, ge=0)


class TablesConfig(TableLifetimeConfig):
    optimizer: TableOptimizerConfig = Field(default_factory=TableOptimizerConfig)
    # make every row of a bounded table when the job starts (memory up front, as a dense
    # table's) instead of at its first use
    materialize: bool = False
    # one table's own admit_after, expire_after or max_rows: [tables.per_table.NAME]
    per_table: dict[str, TableLifetimeOverride] = Field(default_factory=dict)

    def lifetime(self, table: str) -> TableLifetimeConfig:
        """The rules of ``table``: those its ``per_table`` entry gives, the others
        from this section."""
        rules = {k: getattr(self, k) for k in TableLifetimeConfig.model_fields}
        own = self.per_table.get(table)
        if own is not None:
            rules.update({k: v for k, v in own.model_dump().items() if v is not None})
        return TableLifetimeConfig(**rules)

    @model_validator(mode="after")
    def _check_materialize(self) -> TablesConfig:
        if self.materialize and any(self.lifetime(name).declared() for name in ("", *self.per_table)):
            raise _FieldError(
                "materialize",
                "makes every row at the start, which admit_after, expire_after and max_rows would undo: choose one",
            )
        return self
