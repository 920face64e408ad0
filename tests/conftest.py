"""Shared fixtures: real gRPC shards on 127.0.0.1 port 0, torn down after each test."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from psfw.runtime import sync
from psfw.runtime.grpc_transport import ShardClient
from psfw.services.server import ShardServer

from certs import make_pki
from helpers import EXAMPLES


@pytest_asyncio.fixture
async def shard():
    """One running shard (index 0 of 1) and a client for it."""
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0")
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    yield server, client
    await client.close()
    await server.stop(0)


@pytest.fixture
def short_twin_watch(monkeypatch):
    """A process that starts against shards it reported to lately first watches them
    for a start of it that still runs (``sync.WATCH_S``, 5 s) before it joins; where
    the earlier run has ended, as in a rerun one after the other, a short watch sees
    the same quiet shards."""
    monkeypatch.setattr(sync, "WATCH_S", 0.5)


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


@pytest.fixture
def pki(tmp_path) -> dict:
    """Throwaway certificates and a token file (see certs.make_pki)."""
    return make_pki(tmp_path)
