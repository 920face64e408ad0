"""The step model of ``psfw plan``: one synchronous step of a job on n worker hosts
and k shard hosts whose links carry B bytes/s each way, from the costs measured on
this machine (``psfw.tools.plan_calibrate``). Pure arithmetic: no JAX, no process.

Bytes per step (M dense parameter bytes, T bytes of the table rows a worker's
sub-batch uses, its gradients halved by bf16 compression when the config asks):
a worker host's link carries M_up = M c + T up and M_down = M + T down; a shard host's
n M_up / k down and n M_down / k up (the layout balances bytes over shards).

- whole mode (the answers wait for the whole push; TLS links): push, then the update,
  then pull; each phase takes the longer of its busiest link and its busiest
  process's CPU for those bytes.
- pipelined mode (each part answered once every process's part arrived; links in
  clear): the two directions overlap, so the step's communication is the longest of
  every link direction and every process's CPU, plus one part through the pipeline.

Both add the per-message costs (one Update per shard per worker process) and the
compute of a sub-batch. Ring all-reduce beside it: 2 (n - 1) / n of the model each
way on every link, plus the same compute.
"""

from __future__ import annotations

from typing import NamedTuple

MODES = ("pipelined", "whole")
MAX_SHARD_HOSTS = 4096  # where the search for enough shard hosts gives up


class Constants(NamedTuple):
    """What a step costs on the machine that measured it (``plan_constants.json``).

    Attributes:
        machine: where they came from (cpu, cores, date, psfw version).
        payload_share: TCP payload over a link's rate (Ethernet and TCP/IP headers).
        per_message_s: one Update's fixed cost, round trip, over the link.
        push_s_per_byte: a process's CPU per byte of gradients sent or received.
        pull_s_per_byte: a process's CPU per byte of values sent or received.
        update_s_per_byte: the shard's update kernel per parameter byte, by optimizer.
        chunk_bytes: the link's chunk: the least that is encoded before bytes flow.
        compute_rows, compute_s: the benchmark MLP's sub-batches and their compute.
    """

    machine: dict
    payload_share: float
    per_message_s: float
    push_s_per_byte: float
    pull_s_per_byte: float
    update_s_per_byte: dict
    chunk_bytes: int
    compute_rows: list
    compute_s: list

    def update_cost(self, optimizer: str) -> float:
        """Per byte; an optimizer not measured costs as adam (state read and written)."""
        return self.update_s_per_byte.get(optimizer, self.update_s_per_byte["adam"])

    def bench_compute(self, rows: int) -> float:
        """The benchmark MLP's compute of a sub-batch of ``rows``: linear between the
        measured sizes, and beyond them along the line through the nearest two."""
        xs, ys = self.compute_rows, self.compute_s
        i = next((j for j in range(1, len(xs) - 1) if rows <= xs[j]), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(ys[0] * rows / xs[0] if rows < xs[0] else 0.0, ys[i - 1] + slope * (rows - xs[i - 1]))


class Workload(NamedTuple):
    """One job as the model sees it, at a given number of worker hosts.

    Attributes:
        name: what it is, for people.
        batch: the global batch (rows a step).
        dense_bytes: M, the dense parameters.
        table_bytes: T, the bytes of the table rows one worker's sub-batch uses, each
            way (values down, gradients up, ids with them).
        table_total_bytes: every table row (what a dense all-reduce would move), None
            when a table has no bound.
        push_share: the gradients' bytes over the values' (0.5 with bf16).
        optimizer: the dense optimizer's name (its update cost).
        slice_bytes: the part the pipelined step answers at a time.
        compute_s: one worker's compute of its sub-batch.
    """

    name: str
    batch: int
    dense_bytes: int
    table_bytes: float
    table_total_bytes: int | None
    push_share: float
    optimizer: str
    slice_bytes: int
    compute_s: float


class Cluster(NamedTuple):
    """n worker hosts (one worker process each), k shard hosts (one shard each),
    links of ``rate`` bits/s each way, and how the shards answer."""

    workers: int
    shards: int
    rate: int
    mode: str


def _resources(work: Workload, cluster: Cluster, costs: Constants) -> dict[str, float]:
    """Seconds each resource is busy in a step: compute, every link direction, every
    process's CPU by phase."""
    n, k = cluster.workers, cluster.shards
    rate = cluster.rate / 8 * costs.payload_share
    up = work.dense_bytes * work.push_share + work.table_bytes
    down = work.dense_bytes + work.table_bytes
    return {
        "compute": work.compute_s,
        "worker link up": up / rate,
        "worker link down": down / rate,
        "shard link down": n * up / k / rate,
        "shard link up": n * down / k / rate,
        "worker push cpu": up * costs.push_s_per_byte,
        "worker pull cpu": down * costs.pull_s_per_byte,
        "shard push cpu": n * up / k * costs.push_s_per_byte,
        "shard pull cpu": n * down / k * costs.pull_s_per_byte,
        "shard update cpu": (work.dense_bytes + n * work.table_bytes) / k * costs.update_cost(work.optimizer),
    }


_NAMES = {
    "compute": "compute of a sub-batch",
    "worker link up": "worker hosts' links, up (gradients)",
    "worker link down": "worker hosts' links, down (values)",
    "shard link down": "shard hosts' links, down (gradients)",
    "shard link up": "shard hosts' links, up (values)",
    "worker cpu": "a worker process's CPU (encode, send, receive)",
    "shard cpu": "a shard process's CPU (receive, update, send)",
    "messages": "per-message costs (a process's share of every Update: they grow with the hosts)",
}


def predict(work: Workload, cluster: Cluster, costs: Constants) -> dict:
    """One step of ``work`` on ``cluster``: its parts, the step, samples/s, scaling
    efficiency (compute over the step: the step against one host's compute-only
    throughput times n), the bottleneck, ring all-reduce's step beside it and the
    shard hosts it needs before the shards stop being the bottleneck."""
    figures = _step(work, cluster, costs)
    figures["shard_hosts_needed"] = shard_hosts_needed(work, cluster, costs)
    figures["ring"] = ring_step(work, cluster, costs)
    return figures


def _step(work: Workload, cluster: Cluster, costs: Constants) -> dict:
    n, k = cluster.workers, cluster.shards
    busy = _resources(work, cluster, costs)
    worker_cpu = busy["worker push cpu"] + busy["worker pull cpu"]
    shard_cpu = busy["shard push cpu"] + busy["shard update cpu"] + busy["shard pull cpu"]
    # each process handles its own share of every message; one round trip's latency on top
    messages = costs.per_message_s / 2 * (max(k, n) + 1)
    push = max(busy["worker link up"], busy["shard link down"], busy["worker push cpu"], busy["shard push cpu"])
    pull = max(busy["worker link down"], busy["shard link up"], busy["worker pull cpu"], busy["shard pull cpu"])
    update = busy["shard update cpu"]
    # the first chunk is encoded before bytes flow, the last taken in after they stopped
    fill = costs.chunk_bytes * (costs.push_s_per_byte + costs.pull_s_per_byte)
    whole = push + update + pull + fill
    if cluster.mode == "whole":
        comm = whole + messages
    else:
        # a pipeline of parts: the busiest resource's time, and one part's share of the
        # rest (the first part up, the last part's answer down: one part of every flow
        # through the busiest link); a shard's share in one part is the whole step
        links = max(busy[f"{side} link {way}"] for side in ("worker", "shard") for way in ("up", "down"))
        busiest = max(links, worker_cpu, shard_cpu)
        flow = (work.dense_bytes + work.table_bytes) / k  # a worker's bytes to one shard
        parts = max(1.0, flow / work.slice_bytes)
        push, pull, fill = None, None, (whole - busiest) / parts
        comm = busiest + fill + messages
    step = work.compute_s + comm
    load = {
        "compute": busy["compute"],
        **{name: busy[name] for name in busy if " link " in name},
        "worker cpu": worker_cpu,
        "shard cpu": shard_cpu,
        "messages": messages,
    }
    bottleneck = max((name for name in load if name != "compute"), key=load.get)
    if load["compute"] >= load[bottleneck]:
        bottleneck = "compute"
    return {
        "mode": cluster.mode,
        "worker_hosts": n,
        "shard_hosts": k,
        "link_bits_per_s": cluster.rate,
        "compute_s": work.compute_s,
        "push_s": push,
        "update_s": update,
        "pull_s": pull,
        "pipeline_fill_s": fill,
        "messages_s": messages,
        "comm_s": comm,
        "step_s": step,
        "samples_per_s": work.batch / step,
        "efficiency": work.compute_s / step,
        "bottleneck": _NAMES[bottleneck],
        "bottleneck_key": bottleneck,
        "busy_s": {name: value for name, value in load.items()},
        "cpu_s": {
            "worker": {"encode_send": busy["worker push cpu"], "receive": busy["worker pull cpu"]},
            "shard": {
                "receive": busy["shard push cpu"],
                "update": busy["shard update cpu"],
                "send": busy["shard pull cpu"],
            },
        },
        "bytes": {
            "worker_up": work.dense_bytes * work.push_share + work.table_bytes,
            "worker_down": work.dense_bytes + work.table_bytes,
            "shard_down": n * (work.dense_bytes * work.push_share + work.table_bytes) / k,
            "shard_up": n * (work.dense_bytes + work.table_bytes) / k,
        },
    }


def shard_hosts_needed(work: Workload, cluster: Cluster, costs: Constants) -> int | None:
    """The fewest shard hosts with which neither a shard host's link nor a shard
    process's CPU is busier than a worker host's (None: none up to MAX_SHARD_HOSTS)."""
    k = 1
    while k <= MAX_SHARD_HOSTS:
        busy = _resources(work, cluster._replace(shards=k), costs)
        shard = max(
            busy["shard link down"],
            busy["shard link up"],
            busy["shard push cpu"] + busy["shard update cpu"] + busy["shard pull cpu"],
        )
        worker = max(
            busy["worker link up"], busy["worker link down"], busy["worker push cpu"] + busy["worker pull cpu"]
        )
        if shard <= worker * 1.0001:
            return k
        k = max(k + 1, int(k * shard / worker))  # the shards' load falls as 1 / k
    return None


def ring_step(work: Workload, cluster: Cluster, costs: Constants) -> dict:
    """Ring all-reduce of the same model over the n worker hosts: 2 (n - 1) / n of
    the bytes each way on every link, both ways at once, plus the compute. A table
    goes whole (a dense all-reduce has no rows to pick); None for an unbounded one."""
    n = cluster.workers
    if work.table_bytes and work.table_total_bytes is None:
        return {"comm_s": None, "step_s": None, "samples_per_s": None, "efficiency": None}
    moved = work.dense_bytes + (work.table_total_bytes or 0)
    rate = cluster.rate / 8 * costs.payload_share
    comm = 2 * (n - 1) / n * moved / rate
    step = work.compute_s + comm
    return {
        "comm_s": comm,
        "step_s": step,
        "samples_per_s": work.batch / step,
        "efficiency": work.compute_s / step,
        "bytes_each_way": 2 * (n - 1) / n * moved,
    }


__all__ = ["MODES", "Cluster", "Constants", "Workload", "predict", "ring_step", "shard_hosts_needed"]
