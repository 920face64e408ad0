"""The arithmetic of ``psfw bench --hosts``: the configurations its flags name, the
least time a step needs on the links by the cost model, and the figures of a window of
measured steps from the counters read at its ends (``psfw.tools.hosts_bench``)."""

from __future__ import annotations

from typing import NamedTuple

from psfw.tools.bench import BENCH_CONFIG
from psfw.tools.testbed import Link, parse_rate

BATCH = BENCH_CONFIG["train"]["batch_size"]
MAX_HOSTS = 64
CPU_SATURATED = 0.9  # of a core (one host's processes), or of the machine's cores (everything)


class Setup(NamedTuple):
    """One configuration: ``workers`` worker hosts, ``shards`` shard hosts, links of
    ``rate`` bits per second each way."""

    workers: int
    shards: int
    rate: int


def _counts(flag: str, text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: give a count of hosts, or several separated by commas (2,4)") from None
    if any(c < 1 for c in counts):
        raise ValueError(f"{flag} {text}: every count must be at least 1")
    return counts


def setups(hosts: str, shard_hosts: str | None, links: str) -> list[Setup]:
    """The configurations that ``--hosts``, ``--shard-hosts`` and ``--link`` name: each
    worker count with its shard count (one shard count for all, or one each; by
    default as many shard hosts as worker hosts), at each rate.

    Raises:
        ValueError: a count or rate it cannot run, in one line.
    """
    workers = _counts("--hosts", hosts)
    shards = workers if shard_hosts is None else _counts("--shard-hosts", shard_hosts)
    if len(shards) == 1:
        shards = shards * len(workers)
    if len(shards) != len(workers):
        raise ValueError(
            f"--shard-hosts {shard_hosts}: give one count, or one for each of --hosts {hosts} ({len(workers)})"
        )
    for n, k in zip(workers, shards, strict=True):
        if BATCH % n:
            raise ValueError(
                f"--hosts {n}: the batch of {BATCH} rows does not split evenly over {n} worker hosts "
                "(give a divisor of it: 1, 2, 4, 8...)"
            )
        if n + k > MAX_HOSTS:
            raise ValueError(f"--hosts {n} --shard-hosts {k}: at most {MAX_HOSTS} hosts in all")
    rates = [parse_rate(part) for part in links.split(",")]
    return [Setup(n, k, rate) for n, k in zip(workers, shards, strict=True) for rate in rates]


def model_bytes() -> int:
    """The benchmark MLP's parameters, float32: 7,454,760 bytes."""
    sizes = [BENCH_CONFIG["data"]["features"], *BENCH_CONFIG["model"]["hidden"], BENCH_CONFIG["data"]["classes"]]
    return 4 * sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


def ps_model_floor(model: int, workers: int, shards: int, rate: int) -> float:
    """Seconds a psfw step needs on the links at least, by the model: every worker
    host sends the gradients (M) and receives the parameters (M); a shard host carries
    n M / k each way; the two directions overlap on a full-duplex link."""
    return max(model, workers * model / shards) * 8 / rate


def ring_model_floor(model: int, world: int, rate: int) -> float:
    """Seconds a ring all-reduce of ``model`` bytes over ``world`` hosts needs on each
    link at least: 2 (n - 1) / n M each way."""
    return 2 * (world - 1) / world * model * 8 / rate


class Snapshot(NamedTuple):
    """What is read at a step's end: when, each host's link counters and its
    processes' CPU seconds, and the machine's CPU time (clock ticks): busy, in all,
    and in interrupts (the kernel's packet work: veths, bridge, token buckets)."""

    time: float
    links: dict[str, Link]
    cpu: dict[str, float]
    machine: tuple[int, int, int]


def window(first: Snapshot, last: Snapshot, steps: int, rate: int, cpus: int) -> dict:
    """The figures of ``steps`` steps between two snapshots: the step time and
    samples/s; per host, bytes per step each way (``up``: sent), how busy its link was
    each way (bytes over what the rate allows in the step), its processes' CPU
    seconds per step and the cores they kept busy; the link floor (the busiest link's larger direction at the rate:
    the step's least time when a link's two directions overlap) and the serial floor
    (its two directions one after the other); the share of the machine's cores the
    testbed's processes used (``cpu_share``), that the kernel's interrupts used (the
    emulated network's packets, sampled at the clock's ticks; a process's own share
    may hold some of it: ``packet_share``), and that everything used
    (``machine_busy``: the neighbours too); ``cpu_saturated`` when one host's
    processes kept 0.9 of a core busy or the machine's cores were 0.9 busy (then the
    cores, not the links, may set the pace)."""
    wall = last.time - first.time
    step_s = wall / steps
    links = {}
    for host, end in last.links.items():
        start = first.links[host]
        up, down = (end.up - start.up) / steps, (end.down - start.down) / steps
        links[host] = {
            "up_bytes": up,
            "down_bytes": down,
            "busy_up": up * 8 / (rate * step_s),
            "busy_down": down * 8 / (rate * step_s),
            "cpu_s": (last.cpu.get(host, 0.0) - first.cpu.get(host, 0.0)) / steps,
        }
        links[host]["cores"] = links[host]["cpu_s"] / step_s
    busiest = max(links, key=lambda h: max(links[h]["up_bytes"], links[h]["down_bytes"]))
    floor = max(links[busiest]["up_bytes"], links[busiest]["down_bytes"]) * 8 / rate
    serial = max(v["up_bytes"] + v["down_bytes"] for v in links.values()) * 8 / rate
    busy, total, packets = (b - a for a, b in zip(first.machine, last.machine, strict=True))
    machine_busy = busy / total if total else 0.0
    packet_share = packets / total if total else 0.0
    cpu_share = sum(v["cpu_s"] for v in links.values()) * steps / (wall * cpus)
    return {
        "step_s": step_s,
        "samples_per_s": BATCH / step_s,
        "link_floor_s": floor,
        "link_serial_s": serial,
        "step_over_floor": step_s / floor if floor else None,
        "busiest_link": busiest,
        "links": links,
        "cpu_share": cpu_share,
        "packet_share": packet_share,
        "machine_busy": machine_busy,
        "cpu_saturated": max(v["cores"] for v in links.values()) >= CPU_SATURATED or machine_busy >= CPU_SATURATED,
    }


__all__ = [
    "BATCH",
    "Setup",
    "Snapshot",
    "model_bytes",
    "ps_model_floor",
    "ring_model_floor",
    "setups",
    "window",
]
