"""Choosing a transport: ``connect`` picks one per shard, once, and ``connect_all``
says which, in one line (``psfw: process 0 of group 0: shards 0-1 in-process``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from psfw.protocol.layout import Layout
from psfw.protocol.security import NO_SECURITY, Security
from psfw.runtime.grpc_transport import ShardClient
from psfw.runtime.inprocess import InProcessClient, LocalShard
from psfw.runtime.shm_transport import SharedMemoryClient
from psfw.runtime.step_region import StepRegion
from psfw.runtime.transport import Transport

log = logging.getLogger("psfw")


async def connect(
    address: str,
    shard: int,
    *,
    timeout_s: float = 60.0,
    retries: int = 5,
    security: Security = NO_SECURITY,
    local: LocalShard | None = None,
    shared_memory: StepRegion | None = None,
    compression: str = "none",
    data_link: bool = True,
) -> Transport:
    """A transport to the shard at ``address``: in-process when ``local`` (that
    shard, running in this process) is given; through shared memory when
    ``shared_memory`` (the process's region) is given and the shard runs on this
    host; else over the network (the shard's data link where it offers one and
    ``data_link`` allows, else gRPC), its Updates compressed as ``compression`` says."""
    if local is not None:
        return InProcessClient(local, shard, timeout_s)
    client = ShardClient(
        address,
        shard,
        timeout_s=timeout_s,
        retries=retries,
        security=security,
        compression=compression,
        data_link=data_link,
    )
    if shared_memory is not None:
        shared = await SharedMemoryClient.attach(client, shared_memory)
        if shared is not None:
            return shared
    await client.open_data_link()
    return client


async def connect_all(
    addresses: list[str],
    *,
    who: str,
    local: Callable[[str], LocalShard | None] = lambda address: None,
    layout: Layout | None = None,
    **options: Any,
) -> list[Transport]:
    """A transport per shard (see ``connect``); ``local``: the shard of an address
    that runs in this process, if any; ``layout``: the job's, to move the tensors
    of the shards on this host through one shared-memory region (None: never).
    Logs which transports ``who`` uses, once ('' : not at all)."""
    transports = []
    region = StepRegion(layout) if layout is not None else None  # made once a shard on this host takes it
    try:
        for i, address in enumerate(addresses):
            transports.append(await connect(address, i, local=local(address), shared_memory=region, **options))
    except BaseException:  # stopped halfway (a signal, a shard that is not there): no region outlives it
        for transport in transports:
            await transport.close()
        raise
    if who:
        log.info("%s: %s", who, describe_transports(transports))
    return transports


def describe_transports(transports: list[Transport]) -> str:
    """How a stub reaches its shards, per kind: ``shards 0-1 in-process``."""
    by_kind: dict[str, list[int]] = {}
    for t in transports:
        by_kind.setdefault(t.kind, []).append(t.shard)
    return ", ".join(f"{shard_ranges(shards)} {kind}" for kind, shards in by_kind.items())


def shard_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``shards 0-2, 5``; a scattered set is only counted, so the
    text stays short for any number of shards."""
    if len(indices) == 1:
        return f"shard {indices[0]}"
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    if len(runs) > 3:
        return f"{len(indices)} shards"
    return "shards " + ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
