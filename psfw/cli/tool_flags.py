"""The flags of ``psfw``'s tools: ``loadtest``, ``bench`` (on this machine and
between emulated hosts) and ``plan`` (``psfw.cli.flags`` holds the others)."""

from __future__ import annotations

import argparse

from psfw.cli import commands
from psfw.cli.arguments import add_overrides, integer, positive_number, positive_seconds


def add_loadtest(sub: argparse._SubParsersAction) -> None:
    """``psfw loadtest`` and its flags."""
    p = sub.add_parser(
        "loadtest", help="concurrent streams against 2 shard processes: errors, lost/doubled updates, RSS"
    )
    p.add_argument(
        "--groups", type=integer(1), default=32, help="concurrent groups; each keeps one stream open per shard"
    )
    p.add_argument("--seconds", type=positive_seconds, default=10.0, help="how long to send")
    p.add_argument("--mb", type=positive_number("MB"), default=1.0, help="MB of values per shard")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(run=commands.run_loadtest)


def add_bench(sub: argparse._SubParsersAction) -> None:
    """``psfw bench`` and its flags."""
    p = sub.add_parser("bench", help="samples/s of psfw against single-process JAX")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--steps", type=int, help="measured steps per variant (default: 60; with --hosts: 12)")
    p.add_argument("--warmup", type=int, help="unmeasured steps first (default: 10; with --hosts: 3)")
    p.add_argument("--rounds", type=int, help="side-by-side rounds; each figure is its best round (default: 3)")
    p.add_argument("--path", choices=("auto", "grpc"), default="auto", help="grpc: force the network path everywhere")
    p.add_argument("--transfer", metavar="SIZE", help="push + pull of a model of SIZE (e.g. 256MiB): GB/s each way")
    p.add_argument("--scale", action="store_true", help="updates/s of simulated stubs against 1, 2 and 4 shards")
    p.add_argument("--memory", metavar="SIZE", help="train a model of SIZE (e.g. 1GiB): shard peak RSS vs values")
    p.add_argument(
        "--sparse",
        action="store_true",
        help="embedding tables: samples/s and bytes per step by table size, rows held and shard RSS with and "
        "without tables.max_rows (with --scale: rows/s by shards; with --memory SIZE: a table of SIZE over 2 shard "
        "processes; with --stream: a table that runs for months)",
    )
    # --sparse --stream: a table that runs for months (psfw.tools.stream_bench); None: its default
    p.add_argument(
        "--stream",
        action="store_true",
        help="with --sparse: a stream of events through 2 shard processes under admit_after, expire_after and "
        "max_rows, with and without the cap: shard RSS and rows held by step, and a plot",
    )
    p.add_argument("--events", metavar="N", type=integer(1), help="--stream: events in the stream (default 50,000,000)")
    p.add_argument(
        "--distinct", metavar="N", type=integer(20), help="--stream: about this many distinct ids (default 20,000,000)"
    )
    p.add_argument(
        "--max-rows",
        metavar="N",
        type=integer(0),
        help="--stream: tables.max_rows of the capped run (default 1,000,000)",
    )
    p.add_argument(
        "--expire-after", metavar="N", type=integer(0), help="--stream: tables.expire_after, steps (default 2,000)"
    )
    p.add_argument(
        "--admit-after", metavar="N", type=integer(1), help="--stream: tables.admit_after, steps (default 1)"
    )
    p.add_argument(
        "--uncapped-events",
        metavar="N",
        type=integer(0),
        help="--stream: the run without a cap takes the stream's first N events (default 10,000,000; 0: no such run)",
    )
    p.add_argument("--plot", metavar="FILE", help="--stream: where the PNG goes (default stream.png, in this folder)")
    # between emulated hosts (psfw.tools.hosts_bench), as root
    p.add_argument(
        "--hosts",
        metavar="N[,N...]",
        help="the job between N worker hosts and --shard-hosts shard hosts, each a network namespace on one bridge, "
        "every link shaped to --link each way (as root): psfw in clear and in TLS, and DDP, side by side",
    )
    p.add_argument(
        "--shard-hosts",
        metavar="K[,K...]",
        help="--hosts: shard hosts, one count or one for each N (default: as many as worker hosts)",
    )
    p.add_argument(
        "--link",
        metavar="RATE[,RATE...]",
        help="--hosts: each link's rate each way, e.g. 200mbit or 1gbit (default: 200mbit)",
    )
    p.set_defaults(run=commands.run_bench)


def add_plan(sub: argparse._SubParsersAction) -> None:
    """``psfw plan`` and its flags."""
    p = sub.add_parser(
        "plan", help="predict a synchronous step on N worker hosts and K shard hosts from costs measured here"
    )
    p.add_argument("config", nargs="?", help="TOML config to plan, e.g. examples/lm.toml (or --bench)")
    add_overrides(p)
    p.add_argument("--bench", action="store_true", help="plan the benchmark MLP of psfw bench instead of a config")
    p.add_argument("--hosts", metavar="N[,N...]", help="worker hosts (one worker process each)")
    p.add_argument("--shard-hosts", metavar="K[,K...]", help="shard hosts, one count or one for each N (default: N)")
    p.add_argument("--link", metavar="RATE[,RATE...]", help="each link's rate each way, e.g. 200mbit, 10gbit")
    p.add_argument("--tls", action="store_true", help="the links in TLS (then the step is whole by default)")
    p.add_argument("--whole", action="store_true", help="the shards answer after the whole push (today's step)")
    p.add_argument("--pipelined", action="store_true", help="the shards answer each part as it completes")
    p.add_argument(
        "--compute-ms",
        type=float,
        help="the compute of one sub-batch in ms, as your accelerator does it (default: measured here)",
    )
    p.add_argument(
        "--constants", metavar="FILE", help="constants psfw plan --calibrate wrote (default: the ones shipped)"
    )
    p.add_argument("--calibrate", action="store_true", help="measure this machine's constants (about 15 s)")
    p.add_argument("--out", metavar="FILE", help="--calibrate: where to write them (default: plan_constants.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=commands.run_plan)
