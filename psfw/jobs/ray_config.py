"""The ``[ray]`` section of a job's config: what each shard and worker process asks
of a Ray cluster, and how ``psfw ray`` secures and supervises them
(``psfw.jobs.ray_run``). It has no effect on any other command."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from psfw.jobs.optimizer_config import _FieldError, _Strict

# Ray's own resource names: a custom resource may not take one
RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class RayResources(_Strict):
    """What one shard or one worker process reserves on its node."""

    num_cpus: float = Field(1.0, ge=0, allow_inf_nan=False)
    num_gpus: float = Field(0.0, ge=0, allow_inf_nan=False)
    memory: int | None = Field(None, ge=1)  # bytes
    resources: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        taken = [name for name in value if name in RAY_RESOURCES]
        if taken:
            raise ValueError(f"{taken[0]} is Ray's own resource: give it as num_cpus, num_gpus or memory")
        return value

    @model_validator(mode="after")
    def _something(self) -> RayResources:
        if not (self.num_cpus or self.num_gpus or self.memory or self.resources):
            raise _FieldError(
                "num_cpus", "0 with no GPU, memory or custom resource leaves nothing to reserve: give one of them"
            )
        return self

    def bundle(self) -> dict[str, float]:
        """The placement group bundle of one actor."""
        out = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        if self.memory is not None:
            out["memory"] = float(self.memory)
        return {k: v for k, v in out.items() if v}


class RayConfig(_Strict):
    shard: RayResources = Field(default_factory=RayResources)
    worker: RayResources = Field(default_factory=RayResources)
    # a shard listening off loopback without TLS or a token: only on a private network
    insecure: bool = False
    # psfw's own TLS and token on its shards' ports (files every node reads at these paths)
    tls_cert: str | None = None  # the shards' certificate (valid for their nodes' addresses)
    tls_key: str | None = None
    tls_ca: str | None = None  # the CA the workers check the shards' certificates against
    token_file: str | None = None
    restarts: int = Field(10, ge=0)  # how often Ray restarts a dead shard or worker actor
    place_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)  # the longest wait for the job's places
