"""Shared fixtures: real gRPC shards on 127.0.0.1 port 0, torn down after each test;
and the guard of the unit tier (``pytest -m unit``): a test marked ``unit`` that starts
an OS process or trains fails."""

from __future__ import annotations

import asyncio
import multiprocessing.process
import os
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_asyncio

from psfw.runtime import sync, worker
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from certs import make_pki
from helpers import EXAMPLES

UNIT_PROCESS = "a unit test starts no process: mark it otherwise"
UNIT_TRAINING = "a unit test runs no training: mark it otherwise"
# every way this process could start another one, and the loop every worker trains in
STARTS = [
    (subprocess.Popen, "__init__"),  # subprocess.run and friends, asyncio's subprocesses
    (asyncio, "create_subprocess_exec"),
    (asyncio, "create_subprocess_shell"),
    (multiprocessing.process.BaseProcess, "start"),
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
]


class NotAUnitTest(AssertionError):
    pass


@pytest.fixture(autouse=True)
def unit_tests_stay_unit_tests(request, monkeypatch):
    """A test marked ``unit`` that starts an OS process or reaches a worker's training
    loop fails, even where the code under test catches the error it gets."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    tried: list[str] = []

    def refuse(what: str, line: str):
        def refused(*args, **kwargs):
            tried.append(f"{line} ({what})")
            raise NotAUnitTest(tried[-1])

        return refused

    for owner, name in STARTS:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, refuse(f"{owner.__name__}.{name}", UNIT_PROCESS))
    monkeypatch.setattr(worker, "train_steps", refuse("psfw.runtime.worker.train_steps", UNIT_TRAINING))
    yield
    if tried and not request.node.stash.get(CALL_FAILED, False):  # one the code under test caught
        pytest.fail(tried[0], pytrace=False)


CALL_FAILED = pytest.StashKey[bool]()


def pytest_configure(config):
    """A suite started in a shell's background (``cmd &``, nohup) inherits Ctrl-C
    ignored, and so would every process its tests start and then interrupt: they
    would train on. The tests' processes get Ctrl-C as from a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


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
