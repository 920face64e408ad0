"""The job config's ``[cluster]`` table: groups, worker processes, shards and how the
stubs reach them (``psfw.jobs.config`` holds the config it belongs to)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, Field, field_validator, model_validator

from psfw.jobs.config_checks import check_servers
from psfw.jobs.optimizer_config import _FieldError, _Strict


class ClusterConfig(_Strict):
    worker_groups: int = Field(1, ge=1)
    workers_per_group: int = Field(2, ge=1)
    workers_per_process: int = Field(2, ge=1)  # a worker process: one stub and this many workers
    servers: Annotated[int, AfterValidator(check_servers)] = Field(2, ge=1)
    slice_bytes: int = Field(1 << 20, ge=64)
    staleness: int | None = Field(None, ge=0)  # None: groups fully asynchronous; k: SSP bound
    # a group that sends no Update for this long is gone: it no longer bounds the
    # staleness (None: never; asynchronous groups only, as are the two below)
    group_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    # the groups that may train: a group beyond worker_groups joins a running job up
    # to this many ("any": no limit; None: worker_groups, none joins)
    max_groups: int | Literal["any"] | None = None
    # psfw launch: a worker process that dies is started again (it rejoins its group);
    # false: the job stops, or where groups may leave (group_timeout_s) its group is left out
    restart: bool = False
    warmup_steps: int = Field(0, ge=0)  # group 0 trains alone this long before other groups start
    # auto: a shard in this OS process is called directly, one on this host through shared
    # memory and the link's Unix socket; "network" (former name "grpc"): every shard as
    # if on another host (the link's TCP port, else gRPC)
    transport: Literal["auto", "network", "grpc"] = "auto"
    # the network path's Update gradients: "bf16" halves their bytes (error feedback;
    # psfw.protocol.compression); "none" keeps training equal to single-process training
    compression: Literal["none", "bf16"] = "none"
    # Updates to a shard on another host over a link in clear: the shard answers a slice as
    # soon as the group's slice is in, while the rest still travels up
    # (psfw.services.slice_rounds; one group); false: every answer waits for the whole push
    pipeline: bool = True
    # the network path's Put, Get and Update go over a shard's link where it offers one
    # (psfw.protocol.link: a Unix socket on this host, TCP elsewhere, TLS where the
    # shard has it); false: everything over gRPC. ``data_link`` is its former name.
    link: bool = Field(True, validation_alias=AliasChoices("link", "data_link"))
    # which local device each worker of a worker process computes on: "auto" (one each,
    # in turn, when the OS process sees several), or indices into jax.local_devices()
    devices: Literal["auto"] | list[Annotated[int, Field(ge=0)]] = "auto"
    # psfw ray: how the job's shards and worker processes spread over Ray's nodes
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"

    @field_validator("max_groups", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        if value is None or value == "any" or (type(value) is int and value >= 1):
            return value
        raise ValueError('give a number of groups (at least 1), or "any" for no limit')

    @property
    def network_only(self) -> bool:
        """Whether every shard is reached as if on another host."""
        return self.transport != "auto"

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.devices == []:
            raise _FieldError("devices", 'an empty list leaves the workers no device: give indices, or "auto"')
        if self.staleness is not None and self.warmup_steps:
            raise _FieldError(
                "warmup_steps",
                "lets group 0 run ahead alone, which cluster.staleness forbids: set one of them",
            )
        synchronous = "groups in lockstep (cluster.staleness = 0) wait for each other"
        if self.group_timeout_s is not None and self.staleness == 0:
            raise _FieldError("group_timeout_s", f"{synchronous}: drop it, or set staleness >= 1")
        if self.max_groups is not None and self.staleness == 0:
            raise _FieldError("max_groups", f"{synchronous}: drop it, or set staleness >= 1")
        if isinstance(self.max_groups, int) and self.max_groups < self.worker_groups:
            raise _FieldError(
                "max_groups", f"{self.max_groups} is below cluster.worker_groups ({self.worker_groups}): raise it"
            )
        if self.group_timeout_s is not None and self.worker_groups == 1 and self.groups_limit == 1:
            raise _FieldError(
                "group_timeout_s",
                "a job of one group waits for its workers, it has no other group to go on: drop it, or let groups "
                "join (cluster.max_groups)",
            )
        if self.workers_per_group % self.workers_per_process:
            raise _FieldError(
                "workers_per_group",
                f"{self.workers_per_group} must be a multiple of "
                f"cluster.workers_per_process ({self.workers_per_process})",
            )
        return self

    @property
    def processes_per_group(self) -> int:
        return self.workers_per_group // self.workers_per_process

    @property
    def groups_limit(self) -> int | None:
        """How many groups may train (None: any number)."""
        if self.max_groups == "any":
            return None
        return self.max_groups or self.worker_groups

    @property
    def groups_leave(self) -> bool:
        """Whether the job's groups may leave while the others go on (a group timeout)."""
        return self.group_timeout_s is not None
