"""``psfw bench --hosts N --shard-hosts K --link RATE``: the benchmark job between
emulated hosts whose links, not this machine's cores, are the limit.

N worker hosts and K shard hosts, each a network namespace on one bridge
(``psfw.tools.testbed``), every link shaped to RATE each way. Per configuration, side
by side: psfw with the shards' links in clear (``psfw server --insecure``, the private
network mode) and in TLS (certificates for the shard hosts' addresses), and PyTorch
DDP (gloo ring all-reduce) on the same hosts, model and batch where torch is
installed. For each: the step time and samples/s over the measured steps, the bytes
every host's link carried per step each way, how busy each link was, the link floor
(the least time the busiest link needs for its bytes at RATE) and the CPU time of each
host's processes.
"""

from __future__ import annotations

import json
import os
import queue
import re
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from psfw.jobs.children import START_TIMEOUT_S, child_env, psfw_command, read_ready
from psfw.jobs.config import parse_config
from psfw.tools.bench import BENCH_CONFIG
from psfw.tools.bench_certs import make_certs, openssl_installed
from psfw.tools.hosts_figures import BATCH, Setup, Snapshot, model_bytes, ps_model_floor, ring_model_floor, window
from psfw.tools.peer_bench import torch_installed
from psfw.tools.testbed import Testbed

FAST_LINK = 500 * 10**6  # bits/s: links from this rate on get the larger slices
TAIL = 2  # steps run after the measured ones: the window ends in the middle of the traffic, as it starts
DDP_PORT = 29500  # rank 0's, inside its own namespace
_STEP_LINE = re.compile(r"^group 0 step (\d+) .*\(compute ([\d.]+) / comm ([\d.]+) / wait ([\d.]+) ms\)")
_DDP_LINE = re.compile(r"^ddp step (\d+)$")
_PATH_LINE = re.compile(r"^psfw: process 0 of group 0: (.*)$")  # how it reaches the shards
_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's CPU times are in these


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process (all its threads) so far; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _machine() -> tuple[int, int, int]:
    """The machine's CPU time so far (clock ticks): busy, in all, in interrupts."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total, irq + softirq


class _Output:
    """A process's output, read on a thread: its last lines (for an error), and the
    lines ``clock`` matches with the time they arrived, on ``marks``."""

    def __init__(self, name: str, proc: subprocess.Popen, clock: re.Pattern | None = None):
        self.name, self.proc, self.clock = name, proc, clock
        self.head: list[str] = []  # its first lines: what it says as it starts
        self.tail: deque[str] = deque(maxlen=15)
        self.marks: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._read, name=f"output-{name}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            if len(self.head) < 40:
                self.head.append(line)
            self.tail.append(line)
            if self.clock is not None and (found := self.clock.match(line)):
                self.marks.put(found)

    def failure(self, what: str) -> RuntimeError:
        self.thread.join(5)
        lines = "\n".join(f"  {line}" for line in self.tail)
        return RuntimeError(f"{self.name} {what}; its last lines:\n{lines}")


class _Run:
    """One variant's processes in the testbed, and the snapshots at its clock's marks."""

    def __init__(self, bed: Testbed, procs_by_host: dict[str, list[int]]):
        self.bed, self.procs_by_host = bed, procs_by_host
        self.outputs: list[_Output] = []

    def start(self, name: str, host: str, argv: Sequence[str], env: dict, clock: re.Pattern | None = None) -> _Output:
        proc = self.bed.start(
            host, list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        self.procs_by_host.setdefault(host, []).append(proc.pid)
        output = _Output(name, proc, clock)
        self.outputs.append(output)
        return output

    def check(self) -> None:
        """Raise if a process ended with an error."""
        for out in self.outputs:
            code = out.proc.poll()
            if code not in (None, 0):
                raise out.failure(f"exited with status {code}")

    def snapshot(self) -> Snapshot:
        cpu = {host: sum(_cpu_seconds(p) for p in pids) for host, pids in self.procs_by_host.items()}
        return Snapshot(time.perf_counter(), self.bed.links(), cpu, _machine())

    def measure(self, clock: _Output, warmup: int, steps: int, timeout_s: float) -> tuple[Snapshot, Snapshot, list]:
        """Snapshots at the end of step ``warmup`` and of step ``warmup + steps`` as
        ``clock`` prints them; the matches of the steps between."""
        deadline = time.monotonic() + timeout_s
        snaps, seen = [], []
        while len(snaps) < 2:
            try:
                found = clock.marks.get(timeout=0.5)
            except queue.Empty:
                self.check()
                if clock.proc.poll() is not None:
                    raise clock.failure("ended before the measured steps did") from None
                if time.monotonic() > deadline:
                    raise clock.failure(f"did not reach step {warmup + steps} within {timeout_s:.0f} s") from None
                continue
            step = int(found.group(1))
            if step in (warmup, warmup + steps):
                snaps.append(self.snapshot())
            if warmup < step <= warmup + steps:
                seen.append(found)
        return snaps[0], snaps[1], seen

    def close(self) -> None:
        """End the processes and read their last output."""
        self.bed.stop([out.proc for out in self.outputs])
        for out in self.outputs:
            out.thread.join(5)
            out.proc.stdout.close()

    def wait(self, outputs: Sequence[_Output], timeout_s: float) -> None:
        """Wait for ``outputs``' processes to end, each with status 0."""
        deadline = time.monotonic() + timeout_s
        for out in outputs:
            try:
                code = out.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise out.failure(f"did not end within {timeout_s:.0f} s of the last measured step") from None
            if code:
                raise out.failure(f"exited with status {code}")


def _toml(data: dict) -> str:
    """A config dict of scalars, lists and one level of tables as TOML (JSON's
    numbers, strings, booleans and arrays are TOML's)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in data.items():
        if isinstance(values, dict):
            lines += [f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def slice_bytes(rate: int) -> int:
    """The job's cluster.slice_bytes on links of ``rate`` bits/s: 32 KiB below
    ``FAST_LINK``, 128 KiB from it on. A pipelined step fills and drains in about
    two slices per shard at the link's rate, while each slice's message costs the
    hosts' processes the same CPU at any rate; on 4 x 4 hosts here, 32 KiB slices
    took 100 Mbit/s from 1.34 to 1.25 times the floor, and 128 KiB ones kept 1
    Gbit/s at 166 ms a step where 32 KiB ones, CPU-bound, took 307 ms."""
    return 128 << 10 if rate >= FAST_LINK else 32 << 10


def job_config(workers: int, shards: int, steps: int, rate: int, pipeline: bool = True) -> dict:
    """The benchmark job for ``workers`` worker hosts (one worker process each, one
    group) and ``shards`` shards, ``steps`` steps, on links of ``rate`` bits/s;
    ``pipeline``: cluster.pipeline. A shard's part of the model in many slices
    (``slice_bytes``), each answered as soon as the group's is in."""
    cluster = {"worker_groups": 1, "workers_per_group": workers, "workers_per_process": 1, "servers": shards}
    data = {
        **BENCH_CONFIG,
        "train": {**BENCH_CONFIG["train"], "steps": steps},
        "cluster": {**cluster, "slice_bytes": slice_bytes(rate), "pipeline": pipeline},
    }
    parse_config(data, "hosts bench")  # refused here, before any host is made
    return data


class HostsBench:
    """The variants of one testbed's configurations, measured in ``folder``."""

    def __init__(self, bed: Testbed, workers: int, shards: int, warmup: int, steps: int, folder: Path):
        self.bed, self.workers, self.shards = bed, workers, shards
        self.warmup, self.steps, self.folder = warmup, steps, folder
        self.certs = make_certs(folder, [bed.address(f"s{j}") for j in range(shards)]) if openssl_installed() else None
        self.runs = 0

    def _config(self, rate: int, pipeline: bool) -> Path:
        """The job's config file for links of ``rate`` bits/s."""
        path = self.folder / f"job-{rate}-{'pipelined' if pipeline else 'whole'}.toml"
        if not path.exists():
            path.write_text(
                _toml(job_config(self.workers, self.shards, self.warmup + self.steps + TAIL, rate, pipeline))
            )
        return path

    def _timeout(self, rate: int) -> float:
        per_step = max(5.0, 20 * 2 * model_bytes() * 8 / rate)
        return START_TIMEOUT_S + (self.warmup + self.steps) * per_step

    def psfw(self, rate: int, tls: bool, pipeline: bool = True) -> dict:
        """psfw on the testbed: the shards' links in clear or in TLS; ``pipeline``
        False: every answer waits for the whole push."""
        self.runs += 1
        run = _Run(self.bed, {})
        env = child_env()
        serve = ["--tls-cert", str(self.certs.cert), "--tls-key", str(self.certs.key)] if tls else ["--insecure"]
        trust = ["--tls-ca", str(self.certs.ca)] if tls else []
        try:
            addresses, shards = [], []
            for j in range(self.shards):
                ready = self.folder / f"ready-{self.runs}-{j}.json"
                argv = ["server", "--shard", str(j), "--of", str(self.shards), "--grace", "0"]
                argv += ["--listen", f"{self.bed.address(f's{j}')}:0", "--ready-file", str(ready), *serve]
                shards.append(run.start(f"shard {j}", f"s{j}", psfw_command(*argv), env))
                addresses.append(self._ready(run, shards[-1], ready))
            workers = []
            for i in range(self.workers):
                argv = [
                    "worker",
                    str(self._config(rate, pipeline)),
                    "--process",
                    str(i),
                    "--servers",
                    ",".join(addresses),
                    *trust,
                ]
                if i == 0:  # the chief evaluates and writes a run folder
                    argv += ["--run-dir", str(self.folder / f"run-{self.runs}")]
                clock = _STEP_LINE if i == 0 else None
                workers.append(run.start(f"worker process {i}", f"w{i}", psfw_command(*argv), env, clock))
            first, last, lines = run.measure(workers[0], self.warmup, self.steps, self._timeout(rate))
            run.wait(workers, self._timeout(rate))
        finally:
            run.close()
        figures = window(first, last, self.steps, rate, _cpus())
        figures["path"] = next((m.group(1) for line in workers[0].head if (m := _PATH_LINE.match(line))), None)
        figures["compute_ms"] = statistics.median(float(m.group(2)) for m in lines)
        figures["comm_ms"] = statistics.median(float(m.group(3)) for m in lines)
        return figures

    def _ready(self, run: _Run, shard: _Output, ready: Path) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (record := read_ready(ready)) is None:
            run.check()
            if shard.proc.poll() is not None:
                raise shard.failure("ended before it served")
            if time.monotonic() > deadline:
                raise shard.failure(f"did not serve within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        return record["address"]

    def ddp(self, rate: int) -> dict:
        """PyTorch DDP (gloo) with one rank on each worker host."""
        run = _Run(self.bed, {})
        env = {**child_env(), "GLOO_SOCKET_IFNAME": "eth0"}
        master = f"{self.bed.address('w0')}:{DDP_PORT}"
        try:
            ranks = []
            for i in range(self.workers):
                argv = [psfw_command()[0], "-P", "-m", "psfw.tools.peer_bench", "--rank", str(i)]
                argv += ["--world", str(self.workers), "--master", master, "--batch", str(BATCH)]
                argv += ["--steps", str(self.warmup + self.steps + TAIL)]
                clock = _DDP_LINE if i == 0 else None
                ranks.append(run.start(f"DDP rank {i}", f"w{i}", argv, env, clock))
            first, last, _ = run.measure(ranks[0], self.warmup, self.steps, self._timeout(rate))
            run.wait(ranks, self._timeout(rate))
        finally:
            run.close()
        return window(first, last, self.steps, rate, _cpus())


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


VARIANTS = ("insecure", "whole", "tls", "ddp")


def run_hosts(
    configurations: list[Setup],
    warmup: int,
    steps: int,
    say: Callable[[str], None] = lambda line: None,
    variants: Sequence[str] = VARIANTS,
) -> dict:
    """Measure each configuration: psfw in clear, psfw in TLS (where the ``openssl``
    command can make certificates) and DDP (where torch is installed), or only the
    ``variants`` named; one testbed per host count, reshaped for each rate. ``say``
    gets a line as each run ends; a variant not run is None."""
    model = model_bytes()
    results = []
    layouts = list(dict.fromkeys((s.workers, s.shards) for s in configurations))
    for workers, shards in layouts:
        hosts = [f"w{i}" for i in range(workers)] + [f"s{j}" for j in range(shards)]
        with Testbed(hosts) as bed:
            bench = HostsBench(bed, workers, shards, warmup, steps, bed.folder)
            for setup in (s for s in configurations if (s.workers, s.shards) == (workers, shards)):
                bed.shape(setup.rate)
                entry = {
                    "worker_hosts": workers,
                    "shard_hosts": shards,
                    "link_bits_per_s": setup.rate,
                    "ps_model_floor_s": ps_model_floor(model, workers, shards, setup.rate),
                    "ring_model_floor_s": ring_model_floor(model, workers, setup.rate),
                }
                entry["insecure"] = bench.psfw(setup.rate, tls=False) if "insecure" in variants else None
                if entry["insecure"] is not None:
                    say(_said(setup, "psfw insecure", entry["insecure"]))
                entry["whole"] = bench.psfw(setup.rate, tls=False, pipeline=False) if "whole" in variants else None
                if entry["whole"] is not None:
                    say(_said(setup, "psfw whole", entry["whole"]))
                can_tls = bench.certs is not None and "tls" in variants
                entry["tls"] = bench.psfw(setup.rate, tls=True) if can_tls else None
                if entry["tls"] is not None:
                    say(_said(setup, "psfw TLS", entry["tls"]))
                entry["ddp"] = bench.ddp(setup.rate) if torch_installed() and "ddp" in variants else None
                if entry["ddp"] is not None:
                    say(_said(setup, "DDP", entry["ddp"]))
                results.append(entry)
    return {"model_bytes": model, "batch": BATCH, "warmup": warmup, "steps": steps, "cpus": _cpus(), "hosts": results}


def _said(setup: Setup, label: str, figures: dict) -> str:
    return (
        f"{setup.workers} x {setup.shards} at {setup.rate / 1e6:g} Mbit/s, {label}: "
        f"{figures['step_s'] * 1e3:.0f} ms a step"
    )


__all__ = ["VARIANTS", "HostsBench", "job_config", "run_hosts", "slice_bytes"]
