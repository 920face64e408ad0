"""What one worker process of a job hands its stub and the stub's view of the shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psfw.protocol.layout import Layout
from psfw.runtime.param_cache import ParamCache
from psfw.runtime.transport import Transport


@dataclass(frozen=True)
class ProcessSetup:
    """One worker process of a job: where it stands, what it talks to, which job it joins.

    ``clients``: a transport per shard; ``layout``: where each parameter's slices
    lie; ``cache``: the process's parameter cache; ``group``, ``process``: its
    place in the job; ``wait_s``: how long a wait for the shards may take without
    progress; ``identity``: the job's (see psfw.base.identity), None for a tool that
    names no job; ``resume``: joining the job where this group has advanced is
    allowed; ``warmup_steps``: group 0's steps that another group waits for before it
    starts; ``joins``: its group is one the job did not start with (beyond
    ``cluster.worker_groups``), which joins the running job where it stands;
    ``leads``: it is its group's first worker process (the others of a joining group
    start where it does).
    """

    clients: list[Transport]
    layout: Layout
    cache: ParamCache
    group: int
    process: int
    wait_s: float = 120.0
    identity: dict[str, Any] | None = None
    resume: bool = False
    warmup_steps: int = 0
    joins: bool = False
    leads: bool = True
    pipeline: bool = True
