"""``psfw plan``: a synchronous step predicted on a cluster this machine is not, from
the costs measured here (``psfw plan --calibrate``); the step model is
``psfw.tools.plan_model``, what it reads from a config ``psfw.tools.plan_workload``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from psfw.base.console import say
from psfw.tools.hosts_figures import _counts
from psfw.tools.plan_model import Cluster, predict
from psfw.tools.testbed import parse_rate, rate_text

BENCH_NAME = "the benchmark MLP (psfw bench)"


def _mode(args: argparse.Namespace) -> str:
    """What psfw does: pipelined where the links run in clear, whole in TLS."""
    if args.whole and args.pipelined:
        raise ValueError("--whole and --pipelined: give one of them")
    if args.whole:
        return "whole"
    if args.pipelined:
        return "pipelined"
    return "whole" if args.tls else "pipelined"


def clusters(args: argparse.Namespace) -> list[Cluster]:
    """The clusters ``--hosts``, ``--shard-hosts`` and ``--link`` name (lists pair
    as ``psfw bench --hosts`` pairs them).

    Raises:
        ValueError: a flag it cannot use, in one line.
    """
    if args.hosts is None:
        raise ValueError("give the worker hosts with --hosts N (e.g. --hosts 8 --link 10gbit)")
    if args.link is None:
        raise ValueError("give the links' rate with --link RATE, e.g. --link 10gbit or 200mbit")
    workers = _counts("--hosts", args.hosts)
    shards = workers if args.shard_hosts is None else _counts("--shard-hosts", args.shard_hosts)
    if len(shards) == 1:
        shards = shards * len(workers)
    if len(shards) != len(workers):
        raise ValueError(f"--shard-hosts {args.shard_hosts}: give one count, or one for each of --hosts {args.hosts}")
    try:
        rates = [parse_rate(part) for part in args.link.split(",")]
    except ValueError as err:
        raise ValueError(f"--link: {err}") from None
    mode = _mode(args)
    return [Cluster(n, k, rate, mode) for n, k in zip(workers, shards, strict=True) for rate in rates]


def _job(args: argparse.Namespace):
    """The built job of CONFIG or of the benchmark, and its name."""
    from psfw.jobs.config import load_config, parse_config

    if args.bench == bool(args.config):
        raise ValueError("give a CONFIG to plan, or --bench for the benchmark MLP (one of them)")
    if args.bench:
        from psfw.tools.bench import BENCH_CONFIG

        config, name = parse_config(BENCH_CONFIG, "bench"), BENCH_NAME
    else:
        config, name = load_config(args.config, args.set), args.config
    from psfw.jobs.job import build_job

    return build_job(config), name


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def _mb(size: float) -> str:
    return f"{size / 1e6:,.2f} MB"


def describe(plan: dict) -> str:
    """The prediction of one cluster, for people."""
    work, ring, cpu = plan["workload"], plan["ring"], plan["cpu_s"]
    how = "the answers wait for the whole push" if plan["mode"] == "whole" else "parts answered as they complete"
    lines = [
        f"{plan['worker_hosts']} worker hosts x {plan['shard_hosts']} shard hosts, links of "
        f"{rate_text(plan['link_bits_per_s'])} each way, {plan['mode']} ({how})",
        f"  bytes a step: worker link {_mb(plan['bytes']['worker_up'])} up / {_mb(plan['bytes']['worker_down'])} "
        f"down, shard link {_mb(plan['bytes']['shard_down'])} down / {_mb(plan['bytes']['shard_up'])} up",
        f"  compute of a sub-batch ({work['sub_batch']} rows)  {_ms(plan['compute_s'])}",
    ]
    if plan["mode"] == "whole":
        lines += [
            f"  push (gradients up)               {_ms(plan['push_s'])}",
            f"  shard update                      {_ms(plan['update_s'])}",
            f"  pull (values down)                {_ms(plan['pull_s'])}",
            f"  first and last chunk's CPU        {_ms(plan['pipeline_fill_s'])}",
        ]
    else:
        busiest = max(v for k, v in plan["busy_s"].items() if k != "compute")
        lines += [
            f"  busiest link or process           {_ms(busiest)}",
            f"  one part through the pipeline     {_ms(plan['pipeline_fill_s'])}",
        ]
    lines += [
        f"  per-message costs                 {_ms(plan['messages_s'])}",
        f"  worker process CPU: encode and send {_ms(cpu['worker']['encode_send'])}, receive "
        f"{_ms(cpu['worker']['receive'])}; shard process: receive {_ms(cpu['shard']['receive'])}, update "
        f"{_ms(cpu['shard']['update'])}, send {_ms(cpu['shard']['send'])}",
        f"  step {_ms(plan['step_s'])}: {plan['samples_per_s']:,.0f} samples/s, scaling efficiency "
        f"{plan['efficiency']:.0%}; bottleneck: {plan['bottleneck']}",
    ]
    if ring["step_s"] is None:
        lines.append("  ring all-reduce: a table without a bound cannot be all-reduced whole")
    else:
        lines.append(
            f"  ring all-reduce: step {_ms(ring['step_s'])} (communication {_ms(ring['comm_s'])}): "
            f"{ring['samples_per_s']:,.0f} samples/s, scaling efficiency {ring['efficiency']:.0%}"
        )
    needed = plan["shard_hosts_needed"]
    lines.append(
        "  shard hosts needed: more than 4096"
        if needed is None
        else f"  shard hosts needed: {needed} (from {needed} the shards are no longer busier than a worker host)"
    )
    return "\n".join(lines)


def plans(args: argparse.Namespace) -> dict:
    """Every cluster's prediction, with the constants' machine and the job's bytes."""
    from psfw.tools.plan_calibrate import read_constants
    from psfw.tools.plan_workload import sub_batch, workload

    if args.compute_ms is not None and args.compute_ms <= 0:
        raise ValueError(f"--compute-ms {args.compute_ms}: give the compute of a sub-batch in ms, above 0")
    costs = read_constants(args.constants)
    wanted = clusters(args)
    job, name = _job(args)
    batch = job.config.train.batch_size
    for cluster in wanted:
        if cluster.workers > batch:
            raise ValueError(
                f"--hosts {cluster.workers}: the batch of {batch} rows cannot feed {cluster.workers} worker hosts; "
                "raise it (--set train.batch_size=...) or plan fewer hosts"
            )
    compute = None if args.compute_ms is None else args.compute_ms / 1e3
    results, works = [], {}
    for cluster in wanted:
        if cluster.workers not in works:
            works[cluster.workers] = workload(job, name, cluster.workers, costs, args.bench, compute)
        work = works[cluster.workers]
        plan = predict(work, cluster, costs)
        plan["workload"] = {
            "dense_bytes": work.dense_bytes,
            "table_bytes_per_worker": work.table_bytes,
            "sub_batch": sub_batch(batch, cluster.workers),
            "push_share": work.push_share,
            "optimizer": work.optimizer,
        }
        results.append(plan)
    return {"config": name, "batch": batch, "constants": costs.machine, "plans": results}


def plan_bench(cluster: Cluster, constants: Path | None = None) -> dict:
    """The benchmark MLP's step on ``cluster`` (``psfw bench --hosts``'s job), by
    the constants in ``constants`` (default: the shipped ones)."""
    from psfw.jobs.config import parse_config
    from psfw.jobs.job import build_job
    from psfw.tools.hosts_bench import job_config
    from psfw.tools.plan_calibrate import read_constants
    from psfw.tools.plan_workload import workload

    costs = read_constants(constants)
    job = build_job(parse_config(job_config(cluster.workers, cluster.shards, 1, cluster.rate), "plan"))
    return predict(workload(job, BENCH_NAME, cluster.workers, costs, True, None), cluster, costs)


def main(args: argparse.Namespace) -> int:
    """``psfw plan`` and ``psfw plan --calibrate``."""
    if args.calibrate:
        from psfw.tools.plan_calibrate import calibrate, write_constants

        out = Path(args.out or "plan_constants.json")
        constants = calibrate()
        write_constants(constants, out)
        say(f"psfw plan: this machine's constants in {out}; use them with psfw plan --constants {out}")
        print(json.dumps(constants._asdict(), indent=None if args.json else 1))
        return 0
    if args.out:
        raise ValueError("--out names where --calibrate writes the constants: give --calibrate too")
    figures = plans(args)
    if args.json:
        print(json.dumps(figures))
        return 0
    machine = figures["constants"]
    first = figures["plans"][0]["workload"]
    print(
        f"psfw plan: {figures['config']}, batch {figures['batch']}, parameters {_mb(first['dense_bytes'])}"
        f"{' (gradients in bf16)' if first['push_share'] < 1 else ''}, {first['optimizer']}; costs measured on "
        f"{machine['cpu']} ({machine['cores']} cores, {machine['date']}, psfw {machine['psfw']})"
    )
    for plan in figures["plans"]:
        print(describe(plan))
    return 0


__all__ = ["clusters", "describe", "main", "plan_bench", "plans"]
