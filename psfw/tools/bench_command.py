"""``psfw bench``, the command: its sizes and flags checked before anything runs,
the figures measured (``psfw.tools.bench``, ``transfer_bench``, ``sparse_bench``) and
printed, as a table or as one JSON line (``--json``)."""

from __future__ import annotations

import argparse
import json
import re

from psfw.tools.bench import run_bench
from psfw.tools.transfer_bench import MIN_MEMORY_BYTES, MIN_TRANSFER_BYTES, run_memory, run_scale, run_transfer


def parse_size(text: str) -> int:
    """``256MiB``, ``1GB``, ``8388608`` -> bytes."""
    units = {
        "": 1,
        "k": 10**3,
        "kb": 10**3,
        "kib": 2**10,
        "m": 10**6,
        "mb": 10**6,
        "mib": 2**20,
        "g": 10**9,
        "gb": 10**9,
        "gib": 2**30,
    }
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in units:
        raise ValueError(f"size {text!r}: use a number with an optional unit (KiB, MiB, GiB, KB, MB, GB)")
    return int(float(found.group(1)) * units[found.group(2)])


def _size_flag(flag: str, text: str | None, least: int) -> int | None:
    """The size a flag names, checked before anything runs."""
    if text is None:
        return None
    size = parse_size(text)
    if size < least:
        raise ValueError(f"{flag} {text}: the smallest size it measures is {least} bytes")
    return size


def _bytes_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.4g} {unit}"
    return f"{size} bytes"


def main(args: argparse.Namespace) -> int:
    hosts = args.hosts is not None
    _check_hosts_flags(args)
    args.steps = args.steps if args.steps is not None else 12 if hosts else 60
    args.warmup = args.warmup if args.warmup is not None else 3 if hosts else 10
    args.rounds = args.rounds if args.rounds is not None else 3
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise ValueError(
            f"--steps {args.steps}, --warmup {args.warmup}, --rounds {args.rounds}: each must be at least 1 "
            "(the first measured step is timed from the end of the last warmup step)"
        )
    _check_stream_flags(args)
    transfer = _size_flag("--transfer", args.transfer, MIN_TRANSFER_BYTES)
    memory = _size_flag("--memory", args.memory, MIN_MEMORY_BYTES)
    figures: dict = {}
    if hosts:
        return _hosts(args)
    if args.sparse:
        return _sparse(args, memory)
    if transfer is not None:
        figures.update(run_transfer(transfer))
    if args.scale:
        figures.update(run_scale())
    if memory is not None:
        figures.update(run_memory(memory))
    if transfer is None and not args.scale and memory is None:
        figures.update(run_bench(args.steps, args.warmup, args.path, args.rounds))
    if args.json:
        print(json.dumps(figures))
        return 0
    if "single_process" in figures:
        print(
            f"benchmark MLP 784-1024-1024-10, float32, batch 256, SGD; 1 group x 2 workers, 2 shards "
            f"(path: {figures['path']}; best of {figures['rounds']} rounds; devices {', '.join(figures['devices'])})"
        )
        print(f"  single-process JAX      {figures['single_process']:10,.0f} samples/s  (reference)")
        for key, label in (
            ("data_parallel_bound", "2 threads, no server"),
            ("embedded", "psfw embedded"),
            ("separate_processes", "psfw shard processes"),
            ("grpc", "psfw network, gRPC"),
            ("tcp", "psfw network, link"),
            ("tcp_compressed", "  the same, bf16 grads"),
            ("tls", "  the same, in TLS"),
            ("two_groups", "psfw 2 groups x 1"),
            ("ddp", "PyTorch DDP (gloo)"),
        ):
            if figures.get(key) is None:  # DDP without torch, TLS without openssl
                missing = "pip install torch" if key == "ddp" else "install the openssl command"
                print(f"  {label:<22}  not run ({missing} to compare)")
                continue
            rounds = ", ".join(f"{r:.2f}" for r in figures[key + "_round_ratios"])
            of_bound = f"  {figures[key + '_of_bound']:.2f} of the bound" if key + "_of_bound" in figures else ""
            print(
                f"  {label:<22}  {figures[key]:10,.0f} samples/s  ratio {figures[key + '_ratio']:.2f}"
                f"{of_bound}  (rounds: {rounds})"
            )
        print(
            "  bf16 gradients (error feedback): parameters after training off the uncompressed run's by "
            f"{figures['tcp_compressed_param_gap']:.2g} of how far training moved them"
        )
        if figures.get("separate_processes_over_ddp") is not None:
            print(f"  psfw shard processes / DDP: {figures['separate_processes_over_ddp']:.2f}")
    if "transfer_bytes" in figures:
        print(f"transfer of {_bytes_text(figures['transfer_bytes'])} over 2 shards (push / pull, GB/s):")
        print(f"  gRPC          {figures['grpc_push_gb_s']:.3g} / {figures['grpc_pull_gb_s']:.3g}")
        if figures["tcp_push_gb_s"] is not None:
            print(f"  link (TCP)    {figures['tcp_push_gb_s']:.3g} / {figures['tcp_pull_gb_s']:.3g}")
        if figures["shared_memory_update_gb_s"] is not None:
            print(f"  shared memory {figures['shared_memory_update_gb_s']:.3g} (an Update: in and back)")
        print(f"  in-process    {figures['in_process_push_gb_s']:.3g} / {figures['in_process_pull_gb_s']:.3g}")
    if "memory_model_bytes" in figures:
        print(
            f"model of {figures['memory_model_bytes'] / 2**30:.2f} GiB, 2 shards ({figures['memory_path']}): "
            f"shard peak RSS {figures['memory_shard_peak_rss_mb']} MB for {figures['memory_shard_values_mb']} MB "
            f"of values each ({figures['memory_shard_peak_over_values']} x)"
        )
    for shards in (1, 2, 4):
        key = f"scale_{shards}_shards_updates_per_s"
        if key in figures:
            print(f"  {shards} shard(s): {figures[key]:,.1f} updates/s")
    return 0


# the flags of --sparse --stream, as argparse names them (None: the bench's default)
STREAM_FLAGS = ("events", "distinct", "max_rows", "expire_after", "admit_after", "uncapped_events", "plot")


def _check_stream_flags(args: argparse.Namespace) -> None:
    """--stream goes with --sparse, and its flags with --stream, alone."""
    if args.stream and not args.sparse:
        raise ValueError("--stream measures embedding tables: run psfw bench --sparse --stream")
    given = [f"--{name.replace('_', '-')}" for name in STREAM_FLAGS if getattr(args, name) is not None]
    if given and not args.stream:
        raise ValueError(f"{given[0]} belongs to the stream: run psfw bench --sparse --stream {given[0]} ...")
    if args.stream and (args.scale or args.memory is not None or args.transfer is not None):
        raise ValueError("--stream runs alone: drop --scale, --memory and --transfer")


def _check_hosts_flags(args: argparse.Namespace) -> None:
    """--shard-hosts and --link go with --hosts, which runs alone, once."""
    if args.hosts is None:
        given = next(
            (f for f, v in (("--shard-hosts", args.shard_hosts), ("--link", args.link)) if v is not None), None
        )
        if given is not None:
            raise ValueError(f"{given} belongs to --hosts: run psfw bench --hosts N {given} ...")
        return
    others = {
        "--sparse": args.sparse,
        "--stream": args.stream,
        "--scale": args.scale,
        "--transfer": args.transfer is not None,
        "--memory": args.memory is not None,
        "--rounds": args.rounds is not None,
        "--path": args.path != "auto",
    }
    given = [flag for flag, on in others.items() if on]
    if given:
        raise ValueError(f"--hosts runs alone, each configuration once: drop {', '.join(given)}")


def _hosts(args: argparse.Namespace) -> int:
    """``--hosts``: the job between emulated hosts (psfw.tools.hosts_bench), as root."""
    from psfw.base.console import say
    from psfw.tools.hosts_bench import run_hosts
    from psfw.tools.hosts_figures import setups
    from psfw.tools.hosts_report import hosts_table
    from psfw.tools.testbed import check_can_run

    configurations = setups(args.hosts, args.shard_hosts, args.link or "200mbit")
    why = check_can_run()
    if why is not None:
        raise ValueError(f"--hosts cannot run here: {why}")
    figures = run_hosts(configurations, args.warmup, args.steps, say=lambda line: say(f"psfw bench: {line}"))
    print(json.dumps(figures) if args.json else "\n".join(hosts_table(figures)))
    return 0


def _sparse(args: argparse.Namespace, memory: int | None) -> int:
    """``--sparse``: the embedding-table figures (psfw.tools.sparse_bench)."""
    from psfw.tools import sparse_bench

    if args.transfer is not None:
        raise ValueError("--transfer measures dense parameters: run it without --sparse")
    if args.stream:
        return _stream(args)
    figures: dict = {}
    if args.scale:
        figures.update(sparse_bench.run_scale())
    if memory is not None:
        figures.update(sparse_bench.run_memory(memory))
    if not args.scale and memory is None:
        figures.update(sparse_bench.run_sparse(steps=args.steps, warmup=args.warmup))
        figures.update(sparse_bench.run_sparse_cap(steps=args.steps, warmup=args.warmup))
    if args.json:
        print(json.dumps(figures))
        return 0
    if "sparse_dim" in figures:
        print(
            f"embedding bag, {figures['sparse_dim']}-wide rows, {figures['sparse_ids_per_row']} Zipf ids per row, "
            f"batch {figures['sparse_batch']}; 1 group x 2 workers, 2 shards in-process"
        )
        for rows in sparse_bench.SIZES:
            dense = figures[f"dense_{rows}_samples_per_s"]
            shown = f"{dense:10,.0f} samples/s" if dense is not None else "   not run (the whole table every step)"
            print(
                f"  {rows:>12,} rows  tables {figures[f'sparse_{rows}_samples_per_s']:10,.0f} samples/s, "
                f"{figures[f'sparse_{rows}_bytes_per_step'] / 1e6:8.2f} MB/step | dense {shown}, "
                f"{figures[f'dense_{rows}_bytes_per_step'] / 1e6:9.1f} MB/step"
            )
    if "sparse_cap_max_rows" in figures:
        print(
            f"  {figures['sparse_cap_table_rows']:,} rows, Adagrad, over 2 shard processes, without a cap and with "
            f"tables.max_rows {figures['sparse_cap_max_rows']:,}:"
        )
        for name, label in (("uncapped", "no cap"), ("capped", "max_rows")):
            key = f"sparse_{name}_"
            print(
                f"    {label:<8}  rows held {figures[key + 'rows_held']} ({figures[key + 'held_mb']} MB), "
                f"{figures[key + 'bytes_per_step'] / 1e6:.2f} MB/step, {figures[key + 'samples_per_s']:,.0f} "
                f"samples/s, shard RSS {figures[key + 'shard_rss_mb']} MB (peak {figures[key + 'shard_peak_rss_mb']})"
            )
    for shards in (1, 2, 4):
        key = f"sparse_scale_{shards}_shards_rows_per_s"
        if key in figures:
            print(f"  {shards} shard process(es): {figures[key]:,.0f} rows/s pulled + pushed")
    if "sparse_memory_table_bytes" in figures:
        print(
            f"table of {figures['sparse_memory_table_bytes'] / 2**30:.2f} GiB over 2 shard processes: peak RSS "
            f"{figures['sparse_memory_shard_peak_rss_mb']} MB for {figures['sparse_memory_shard_held_mb']} MB of rows "
            f"and state held ({figures['sparse_memory_shard_peak_over_held']} x)"
        )
    return 0


def _stream(args: argparse.Namespace) -> int:
    """``--sparse --stream``: a table that runs for months (psfw.tools.stream_bench),
    its figures and its plot."""
    from pathlib import Path

    from psfw.tools.stream_bench import run_stream
    from psfw.tools.stream_plot import write_stream_plot

    plot = Path(args.plot or "stream.png").absolute()
    given = {name: getattr(args, name) for name in STREAM_FLAGS if name != "plot" and getattr(args, name) is not None}
    figures = run_stream(**given)
    write_stream_plot(figures, plot)
    figures["stream_plot"] = str(plot)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(
        f"a stream of {figures['stream_events']:,} events over about {figures['stream_distinct']:,} distinct ids "
        f"(a Zipf head and a uniform tail), {figures['stream_batch']:,} a step; a table of "
        f"{figures['stream_dim']}-wide rows, Adagrad, admit_after {figures['stream_admit_after']}, expire_after "
        f"{figures['stream_expire_after']:,}; {figures['stream_shards']} shard processes, 1 simulated worker process"
    )
    for name in ("capped", "uncapped"):
        key = f"stream_{name}_"
        if key + "steps" not in figures:
            continue
        cap = figures[key + "max_rows"]
        if cap:
            print(f"  max_rows {cap:,} ({figures[key + 'shard_cap']:,} a shard), the whole stream:")
        elif figures[key + "events"] == figures["stream_events"]:
            print("  no cap, the whole stream:")
        else:
            print(
                f"  no cap, the stream's first {figures[key + 'events']:,} events only (without a cap a shard holds "
                "every row expiry leaves: this run is kept shorter, to fit in memory):"
            )
        print(
            f"    {figures[key + 'steps']:,} steps in {figures[key + 'seconds']:,.1f} s "
            f"({figures[key + 'steps_per_s']:,.1f} steps/s), {figures[key + 'bytes_per_step'] / 1e6:.3f} MB/step, "
            f"{figures[key + 'distinct_ids']:,} distinct ids, over {figures[key + 'path']}"
        )
        print(
            f"    at the end: rows held {figures[key + 'rows_held'][-1]}, ids waiting {figures[key + 'ids_waiting'][-1]}, "
            f"shard RSS {figures[key + 'rss_mb'][-1]} MB (at the start {figures[key + 'rss_mb'][0]}, peak "
            f"{figures[key + 'peak_rss_mb']})"
        )
        print(
            f"    rows admitted {figures[key + 'admitted']}, expired {figures[key + 'expired']}, evicted "
            f"{figures[key + 'evicted']}; the head's {figures['stream_top_ids']:,} most frequent ids holding a row: "
            f"{figures[key + 'head_held_share']:.3f}"
        )
    print(f"  plot: {plot}")
    return 0


__all__ = ["main", "parse_size"]
