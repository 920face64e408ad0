"""A shard's refusal log: one line per kind of refusal in an interval, the repeats
counted, a bounded number of kinds, reasons cut to length."""

import logging

import pytest

from psfw.services.refusals import RefusalLog, peer_host

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal_log(caplog, **options) -> tuple[RefusalLog, Clock]:
    caplog.set_level(logging.WARNING, logger="psfw.test-refusals")
    clock = Clock()
    return RefusalLog(3, clock=clock, logger=logging.getLogger("psfw.test-refusals"), **options), clock


def test_peers_are_named_by_host_not_by_port():
    assert peer_host("ipv4:127.0.0.1:51234") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:51234") == "::1"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
    assert peer_host("") == "unknown peer"


def test_repeats_are_counted_and_reported_once_the_interval_ends(caplog):
    log, clock = refusal_log(caplog, interval_s=10)
    for port in range(50):  # one client, a new connection each time
        log.refused(f"ipv4:127.0.0.1:{40000 + port}", "Get", "INVALID_ARGUMENT", "malformed GetRequest")
    log.refused("ipv4:127.0.0.9:1", "Get", "INVALID_ARGUMENT", "malformed GetRequest")
    log.refused("ipv4:127.0.0.1:1", "Update", "NOT_FOUND", "shard 3 holds no slice x[0]")
    assert caplog.messages == [
        "shard 3 refused Get from 127.0.0.1: INVALID_ARGUMENT: malformed GetRequest",
        "shard 3 refused Get from 127.0.0.9: INVALID_ARGUMENT: malformed GetRequest",
        "shard 3 refused Update from 127.0.0.1: NOT_FOUND: shard 3 holds no slice x[0]",
    ]
    clock.now += 12  # the next refusal finds the interval over: the counts first, then a new interval
    log.refused("ipv4:127.0.0.1:2", "Get", "INVALID_ARGUMENT", "malformed GetRequest")
    assert caplog.messages[3:] == [
        "shard 3 refused 49 more Get from 127.0.0.1 (INVALID_ARGUMENT) in 12 s",
        "shard 3 refused Get from 127.0.0.1: INVALID_ARGUMENT: malformed GetRequest",
    ]
    assert log.total == 53


def test_kinds_past_the_limit_are_counted_together_and_reasons_are_cut(caplog):
    log, clock = refusal_log(caplog, max_kinds=2, max_reason=20)
    for host in range(5):
        log.refused(f"ipv4:127.0.0.{host}:1", "Put", "INVALID_ARGUMENT", "x" * 100)
    assert caplog.messages == [
        f"shard 3 refused Put from 127.0.0.{host}: INVALID_ARGUMENT: {'x' * 20}... (100 characters)"
        for host in range(2)
    ]
    clock.now += 1
    log.flush()  # a stopping shard reports what it counted
    assert caplog.messages[2:] == ["shard 3 refused 3 more requests of other kinds in 1 s"]
    log.flush()
    assert len(caplog.messages) == 3, "nothing new: nothing more to say"
