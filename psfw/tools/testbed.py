"""Emulated hosts on this machine, for ``psfw bench --hosts``: each host a network
namespace with its own address, every host's link a veth pair to one bridge, and the
bridge in a namespace of its own (the switch), so nothing touches the root
namespace's interfaces or firewall (a Docker engine's FORWARD DROP policy never sees
this traffic). Each link can be shaped to a rate in each direction independently: a
``tc`` token bucket on both ends of the veth (the host's end shapes what it sends, the
switch's end what it receives); the bridge itself is unlimited, a non-blocking switch.

Every name (the namespaces, and the testbed's folder for files under the temporary
folder) starts with ``PREFIX`` and the owner's process id and start time, so a
testbed whose owner was killed is found and removed by the next one
(``remove_stale``), and two testbeds of live owners leave each other alone. The
processes a testbed starts get SIGTERM when their owner dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

PREFIX = "psfwtb"
SUBNET = "10.231.11."  # private addresses, inside the testbed's own namespaces only
DEVICE = "eth0"  # each host's end of its link
BRIDGE = "br0"
LATENCY = "50ms"  # the token bucket's queue: how long a packet may wait for tokens
STOP_S = 10.0  # how long a process gets to end after SIGTERM, before SIGKILL
_NAME = re.compile(rf"^{PREFIX}(\d+)x(\d+)-")
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmg]?)bit(?:/s)?\s*")  # never tc's "mbps": megabytes


class Link(NamedTuple):
    """Bytes a host's link carried, from the host's side: ``up`` sent, ``down`` received."""

    up: int
    down: int


def parse_rate(text: str) -> int:
    """A link rate in bits per second: ``200mbit``, ``1Gbit/s``, ``100 Mbit`` (``k``,
    ``m``, ``g``: powers of 1000, as ``tc`` reads them).

    Raises:
        ValueError: not a rate, or below 1 Mbit/s (a step would take minutes).
    """
    found = _RATE.fullmatch(text.lower())
    if not found:
        raise ValueError(f"link rate {text!r}: use a number of bits per second with a unit, e.g. 200mbit or 1gbit")
    bits = int(float(found.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[found.group(2)])
    if bits < 10**6:
        raise ValueError(f"link rate {text!r}: the slowest link it emulates is 1mbit")
    return bits


def rate_text(bits: int) -> str:
    """``200 Mbit/s``, ``1 Gbit/s``."""
    for unit, scale in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits} bit/s"


def tbf_burst(bits: int) -> int:
    """The token bucket's size in bytes: 2 ms at the rate, at least 64 KiB (a 64 KiB
    packet of the veth's segmentation offload must fit; a smaller bucket throttles
    below the rate). Measured here with 200 Mbit/s: 183-190 Mbit/s of TCP payload
    each way at once; with 1 Gbit/s: 948-960."""
    return max(64 * 1024, bits // 8 * 2 // 1000)


def check_can_run() -> str | None:
    """Why a testbed cannot be made here, in one line; None if it can."""
    if not os.path.isdir("/proc/self/ns") or not hasattr(os, "geteuid"):
        return "it needs Linux network namespaces"
    if os.geteuid() != 0:
        return "it makes network namespaces and shapes links with tc, which needs root: run it as root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"it needs iproute2's {' and '.join(missing)} command (apt-get install iproute2)"
    return None


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), or None when there is none:
    with the id, it names one process even after ids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{PREFIX}{pid}x{_start_time(pid)}-"


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def _pids(name: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()]


def _end_namespace(name: str) -> None:
    """End every process in namespace ``name`` (SIGTERM, then SIGKILL), then the namespace;
    its links, the bridge and their qdiscs go with it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _pids(name)
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_S
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _pids(name)
        if not left:
            break
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _stale(name: str) -> bool:
    found = _NAME.match(name)
    return found is not None and _start_time(int(found.group(1))) != int(found.group(2))


def remove_stale() -> list[str]:
    """Remove the namespaces (and the processes in them) and folders of testbeds whose
    owner no longer runs (killed before it could clean up); returns their names."""
    stale = []
    for name in _namespaces():
        if _stale(name):
            _end_namespace(name)
            stale.append(name)
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if _stale(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder.name)
    return stale


def _die_with_owner() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Testbed:
    """Hosts named ``hosts`` on one bridge, each with its address (``address``),
    made on entry (after removing stale testbeds) and removed on exit with every
    process started in them.

    Example::

        with Testbed(["s0", "w0"]) as bed:
            bed.shape(200 * 10**6)
            shard = bed.start("s0", ["psfw", "server", "--listen", f"{bed.address('s0')}:0", "--insecure"])
    """

    def __init__(self, hosts: Sequence[str]):
        if len(set(hosts)) != len(hosts) or not 0 < len(hosts) < 250:
            raise ValueError(f"hosts {list(hosts)}: give 1 to 249 distinct names")
        self.hosts = list(hosts)
        self.tag = _owner_tag()
        self.switch = f"{self.tag}sw"
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self.rate: int | None = None
        self.folder: Path | None = None  # for the runs' files, made on entry

    def namespace(self, host: str) -> str:
        return f"{self.tag}{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}{self.hosts.index(host) + 1}"

    def _port(self, host: str) -> str:
        return f"p{self.hosts.index(host)}"  # the switch's end of the host's link

    def __enter__(self) -> Testbed:
        remove_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.tag}files-"))
        for name in [self.switch, *map(self.namespace, self.hosts)]:
            _run("ip", "netns", "add", name)
            self._made.append(name)
        _run("ip", "-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", BRIDGE, "up")
        for host in self.hosts:
            ns, port = self.namespace(host), self._port(host)
            _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", DEVICE, "netns", ns)
            _run("ip", "-n", self.switch, "link", "set", port, "master", BRIDGE)
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", DEVICE)
            _run("ip", "-n", ns, "link", "set", DEVICE, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def shape(self, bits: int) -> None:
        """Every link to ``bits`` per second each way: a token bucket on the host's end
        (what it sends) and on the switch's end (what it receives)."""
        spec = ["tbf", "rate", f"{bits}bit", "burst", str(tbf_burst(bits)), "latency", LATENCY]
        for host in self.hosts:
            _run("tc", "-n", self.namespace(host), "qdisc", "replace", "dev", DEVICE, "root", *spec)
            _run("tc", "-n", self.switch, "qdisc", "replace", "dev", self._port(host), "root", *spec)
        self.rate = bits

    def links(self) -> dict[str, Link]:
        """Each host's link counters now, read at the switch's end of every link at
        once (what the switch sent a host is what the host received)."""
        ports = {self._port(h): h for h in self.hosts}
        seen = json.loads(_run("ip", "-n", self.switch, "-j", "-s", "link", "show"))
        counts = {}
        for dev in seen:
            host = ports.get(dev.get("ifname"))
            if host is not None:
                stats = dev["stats64"]
                counts[host] = Link(up=stats["rx"]["bytes"], down=stats["tx"]["bytes"])
        return counts

    def start(self, host: str, argv: Sequence[str], **popen) -> subprocess.Popen:
        """Run ``argv`` in ``host``'s namespace; the process ends with the testbed
        (and gets SIGTERM if this process dies first). Call from the main thread: the
        signal follows the thread that started the process."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(host), *argv], preexec_fn=_die_with_owner, **popen
        )
        self._procs.append(proc)  # ip netns exec execs argv: this is its process id
        return proc

    def stop(self, procs: Sequence[subprocess.Popen]) -> None:
        """End ``procs`` (SIGTERM, then SIGKILL after ``STOP_S``)."""
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        """End every process started here and remove the namespaces (with them the
        links, the bridge and the qdiscs)."""
        try:
            self.stop(self._procs)
        finally:
            for name in reversed(self._made):
                _end_namespace(name)
            self._made.clear()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["PREFIX", "Link", "Testbed", "check_can_run", "parse_rate", "rate_text", "remove_stale", "tbf_burst"]
