"""Choosing a transport: ``connect`` picks one per shard, once, when the shard first
answers, and ``connect_all`` says which, in one line (``psfw: process 0 of group 0:
shards 0-1 in-process``). Both check that the shard is the one its place in the list
says (its ``--shard I --of S``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from psfw.base.errors import ShardError, UsageError
from psfw.base.security import NO_SECURITY, Security
from psfw.proto import ps_pb2 as pb
from psfw.protocol.layout import Layout
from psfw.runtime.grpc_channel import Locate
from psfw.runtime.inprocess import InProcessClient, ShardHere
from psfw.runtime.shard_client import ShardClient
from psfw.runtime.step_region import StepRegion
from psfw.runtime.transport import Transport

log = logging.getLogger("psfw")
DUPLICATE_HINT = "give each shard's address once, in the order of their --shard"


async def connect(
    address: str,
    shard: int,
    *,
    timeout_s: float = 60.0,
    retries: int = 5,
    security: Security = NO_SECURITY,
    here: ShardHere | None = None,
    shared_memory: StepRegion | None = None,
    compression: str = "none",
    link: bool = True,
    same_host: bool = True,
    shards: int | None = None,
    deadline: float | None = None,
    locate: Locate | None = None,
) -> Transport:
    """Open a transport to one shard, chosen by where the shard runs.

        transport = await psfw.connect("10.0.0.5:50051", 0)
        fresh = await transport.get(psfw.GetHeader(group=0, step=0, keys=[("w", 0)]), expect)
        await transport.close()

    Args:
        address: the shard's gRPC address, ``host:port``.
        shard: its index: the shard must have been started ``--shard`` this.
        timeout_s: the deadline of each call, and how long a shard that is not up
            yet is waited for (unless ``deadline``).
        retries: how often a call that cannot reach the shard is tried again.
        security: TLS certificates and the bearer token (``psfw.base.security``).
        here: the shard itself, when it runs in this process (the trainer hands it
            in): it is then called directly.
        shared_memory: the process's region (``StepRegion``): where the shard runs
            on this host, an Update's tensors lie there instead of in its messages.
        compression: ``"bf16"`` sends an Update's float32 gradients as bfloat16.
        link: use the shard's link (its Unix socket on this host, its TCP port
            elsewhere) for Put, Get and Update; False: gRPC only.
        same_host: False reaches the shard as if it ran on another host.
        shards: how many shards the job has: a shard started ``--of`` another
            number is refused.
        deadline: when to stop waiting for the shard (``time.monotonic()``).
        locate: where shard I listens now (``await locate(I)``), asked while it
            cannot be reached: for shards that an engine restarts elsewhere.

    Returns:
        A ``Transport``: in-process, or a ``ShardClient`` (the link where the shard
        offers one, else gRPC). The path is chosen by the shard's first answer.

    Raises:
        UsageError: the shard at ``address`` is not shard ``shard`` (of ``shards``).
        ShardError: the shard cannot be reached by ``deadline``.
    """
    if here is not None:
        client = InProcessClient(here, shard, timeout_s)
        check_wiring(await client.describe(), address, shard, shards)
        return client
    client = ShardClient(
        address,
        shard,
        timeout_s=timeout_s,
        retries=retries,
        security=security,
        compression=compression,
        link=link,
        same_host=same_host,
        locate=locate,
    )
    try:
        reply = await first_answer(client, time.monotonic() + timeout_s if deadline is None else deadline)
        check_wiring(reply, address, shard, shards)
        if shared_memory is not None:
            client.share_memory(shared_memory, reply)
        await client.open_link(reply)
    except BaseException:
        await client.close()
        raise
    return client


async def first_answer(client: ShardClient, deadline: float) -> pb.DescribeReply:
    """The shard's first Describe answer; a shard that cannot be reached yet (or
    loads its checkpoint) is asked again until ``deadline`` (the client says every
    few seconds that it waits)."""
    delay = 0.05
    while True:
        try:
            return await client.describe()
        except ShardError as err:
            if err.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def check_wiring(
    reply: pb.DescribeReply, address: str, shard: int, shards: int | None, listed: str = "--servers lists"
) -> None:
    """Refuse a shard whose own ``--shard I --of S`` disagrees with its place in the
    list of addresses (``listed``: what the user gave it as): its slices, table rows
    and checkpoint files are another shard's."""
    problem = wiring_problem(reply, address, shard, shards, listed)
    if problem:
        raise UsageError(problem)


def wiring_problem(
    reply: pb.DescribeReply, address: str, shard: int, shards: int | None, listed: str = "--servers lists"
) -> str:
    """What is wrong with the shard at ``address`` at place ``shard`` of the list, in
    one line ('' if nothing)."""
    if shards is not None and reply.shards != shards:
        return (
            f"{address} was started --of {reply.shards}, but {listed} {shards} shards: "
            f"start every shard with --of {shards}, or list the shards of one cluster"
        )
    if reply.shard != shard:
        return (
            f"{address} is shard {reply.shard} of {reply.shards}, but {listed} it {_ordinal(shard)}: "
            "list the shards in the order of their --shard (shard 0 first)"
        )
    return ""


def _ordinal(index: int) -> str:
    """0 -> ``first``, 3 -> ``4th``."""
    if index < 3:
        return ("first", "second", "third")[index]
    n = index + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


async def connect_all(
    addresses: list[str],
    *,
    who: str,
    here: Callable[[str], ShardHere | None] = lambda address: None,
    layout: Layout | None = None,
    **options: Any,
) -> list[Transport]:
    """A transport per shard (see ``connect``); ``here``: the shard of an address
    that runs in this process, if any; ``layout``: the job's, to move the tensors
    of the shards on this host through one shared-memory region (None: never).
    Logs which transports ``who`` uses, once ('' : not at all). Shards that are
    not up yet are waited for (``timeout_s`` in all); UsageError for an address
    listed twice or a shard that is not the one its place says."""
    twice = next((a for i, a in enumerate(addresses) if a in addresses[:i]), None)
    if twice is not None:
        raise UsageError(f"--servers lists {twice} twice: {DUPLICATE_HINT}")
    transports = []
    region = StepRegion(layout) if layout is not None else None  # made once a shard on this host takes it
    deadline = time.monotonic() + options.get("timeout_s", 60.0)
    try:
        for i, address in enumerate(addresses):
            transport = await connect(
                address,
                i,
                here=here(address),
                shared_memory=region,
                shards=len(addresses),
                deadline=deadline,
                **options,
            )
            transports.append(transport)
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
