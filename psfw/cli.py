"""The ``psfw`` command: train, server, worker, launch, status, health, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from psfw.console import say
from psfw.errors import ConfigError, PsfwError


def _train(args: argparse.Namespace) -> int:
    from psfw.config import load_config
    from psfw.launcher import train

    config = load_config(args.config)
    result = train(config, args.run_dir, progress=not args.no_progress, resume=args.resume)
    acc = result.test_accuracy
    line = f"test loss {result.test_loss:.4f}" + (f", test accuracy {acc:.4f}" if acc is not None else "")
    print(f"{line}; {result.steps} steps; outputs in {result.run_dir}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from psfw.security import Security
    from psfw.services.server import serve

    try:
        asyncio.run(
            serve(
                args.shard,
                args.of,
                args.listen,
                grace=args.grace,
                drain=args.drain,
                metrics_port=args.metrics_port,
                nonfinite=args.nonfinite,
                insecure=args.insecure,
                checkpoint_dir=args.checkpoint_dir,
                security=Security.from_files(args.tls_cert, args.tls_key, args.tls_client_ca, args.token_file),
            )
        )
    except (PermissionError, OSError, ValueError) as err:
        say(f"psfw server: {err}")
        return 2
    return 0


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PSFW_{name}", default)


def _client_security(args: argparse.Namespace):
    from psfw.security import Security

    return Security.from_files(args.tls_cert, args.tls_key, args.tls_ca, args.token_file)


def _add_client_security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=_env("TLS_CA"), help="CA certificate that signed the shards' (turns on TLS)")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"), help="this client's certificate, for mutual TLS")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="this client's private key, for mutual TLS")
    p.add_argument("--token-file", default=_env("TOKEN_FILE"), help="file holding the bearer token")


def _worker(args: argparse.Namespace) -> int:
    from psfw.config import load_config
    from psfw.launcher import train

    config = load_config(args.config)
    servers = [a.strip() for a in args.servers.split(",") if a.strip()]
    result = train(
        config, args.run_dir, progress=False, servers=servers, processes=[args.process], security=_client_security(args)
    )
    if result.run_dir is not None:
        acc = result.test_accuracy
        print(f"test loss {result.test_loss:.4f}" + (f", test accuracy {acc:.4f}" if acc is not None else ""))
        print(f"outputs in {result.run_dir}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from psfw.config import load_config
    from psfw.launch import launch
    from psfw.outputs import new_run_dir

    config = load_config(args.config)
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir()
    return asyncio.run(launch(Path(args.config), config, run_dir))


def _status(args: argparse.Namespace) -> int:
    from psfw.cluster import Cluster, format_status

    async def show() -> None:
        addresses = [a.strip() for a in args.servers.split(",") if a.strip()]
        async with Cluster(addresses, security=_client_security(args)) as cluster:
            print(format_status(await cluster.status(args.interval)))

    asyncio.run(show())
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    security = _client_security(args)
    if security.ca is not None:
        credentials = grpc.ssl_channel_credentials(security.ca, security.key, security.cert)
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}: {err.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _loadtest(args: argparse.Namespace) -> int:
    import json

    from psfw.loadtest import load_test

    figures = load_test(args.groups, args.seconds, args.mb)
    print(json.dumps(figures, indent=None if args.json else 1))
    ok = not figures["errors"] and not figures["lost"] and not figures["doubled"] and figures["values_consistent"]
    return 0 if ok else 1


def _bench(args: argparse.Namespace) -> int:
    from psfw.bench import main as bench_main

    try:
        return bench_main(args)
    except ValueError as err:  # a flag it cannot use (a size, a count): say which
        say(f"psfw bench: {err}")
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psfw", description="asyncio parameter server for data-parallel JAX training")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config end to end on this machine (embedded shards)")
    t.add_argument("config", help="TOML config, e.g. examples/digits_mlp.toml")
    t.add_argument("--run-dir", help="folder for the outputs (default: a new folder under runs/)")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    t.set_defaults(run=_train)

    s = sub.add_parser(
        "server",
        help="serve one parameter-server shard",
        description="Serve one shard. Every flag can also come from the environment (PSFW_SHARD, PSFW_SHARDS, "
        "PSFW_LISTEN, PSFW_GRACE, PSFW_DRAIN, PSFW_METRICS_PORT, PSFW_NONFINITE, PSFW_CHECKPOINT_DIR, "
        "PSFW_TLS_CERT, PSFW_TLS_KEY, PSFW_TLS_CLIENT_CA, PSFW_TOKEN_FILE, PSFW_INSECURE=1), "
        "so a container needs no arguments.",
    )
    s.add_argument("--shard", type=int, default=int(_env("SHARD", "0")), help="this shard's index")
    s.add_argument("--of", type=int, default=int(_env("SHARDS", "1")), help="how many shards the cluster has")
    s.add_argument(
        "--listen", default=_env("LISTEN", "127.0.0.1:50051"), help="address to listen on (port 0: any free port)"
    )
    s.add_argument(
        "--grace", type=float, default=float(_env("GRACE", "5")), help="seconds in-flight RPCs get on shutdown"
    )
    s.add_argument("--drain", type=float, default=float(_env("DRAIN", "0")), help="seconds NOT_SERVING before stopping")
    s.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("METRICS_PORT")) if _env("METRICS_PORT") else None,
        help="serve Prometheus metrics on this HTTP port",
    )
    s.add_argument(
        "--nonfinite", choices=("reject", "skip"), default=_env("NONFINITE", "reject"), help="NaN/Inf gradient policy"
    )
    s.add_argument(
        "--checkpoint-dir",
        default=_env("CHECKPOINT_DIR"),
        help="folder shared by the job's shards for checkpoints; the newest complete one is loaded at start",
    )
    s.add_argument("--tls-cert", default=_env("TLS_CERT"), help="server certificate (PEM): turns on TLS")
    s.add_argument("--tls-key", default=_env("TLS_KEY"), help="server private key (PEM)")
    s.add_argument(
        "--tls-client-ca", default=_env("TLS_CLIENT_CA"), help="require client certificates signed by this CA (mTLS)"
    )
    s.add_argument("--token-file", default=_env("TOKEN_FILE"), help="require this bearer token on every RPC but health")
    s.add_argument(
        "--insecure",
        action="store_true",
        default=_env("INSECURE", "0") == "1",
        help="allow a non-loopback address without TLS or a token",
    )
    s.set_defaults(run=_server)

    w = sub.add_parser("worker", help="run one worker process of a cluster against running shards")
    w.add_argument("config", help="the job's TOML config (the same for every process)")
    w.add_argument("--process", type=int, default=int(_env("PROCESS", "0")), help="this process's index")
    w.add_argument(
        "--servers", default=_env("SERVERS", ""), help="shard addresses host:port, comma-separated, in shard order"
    )
    w.add_argument("--run-dir", default=_env("RUN_DIR"), help="outputs folder (process 0 evaluates and writes)")
    _add_client_security(w)
    w.set_defaults(run=_worker)

    la = sub.add_parser("launch", help="run the shards and worker processes of a config as OS processes here")
    la.add_argument("config", help="TOML config")
    la.add_argument("--run-dir", help="folder for the outputs (default: a new folder under runs/)")
    la.set_defaults(run=_launch)

    st = sub.add_parser("status", help="a running cluster's shards: keys, bytes, versions, groups, update rate")
    st.add_argument("servers", help="shard addresses host:port, comma-separated")
    st.add_argument("--interval", type=float, default=1.0, help="seconds over which to measure the update rate")
    _add_client_security(st)
    st.set_defaults(run=_status)

    h = sub.add_parser("health", help="probe a shard's gRPC health service (exit 0 when SERVING)")
    h.add_argument("address", help="host:port of the shard")
    h.add_argument("--service", default="", help="service name ('' = the whole server)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    _add_client_security(h)
    h.set_defaults(run=_health)

    lt = sub.add_parser(
        "loadtest", help="concurrent streams against 2 shard processes: errors, lost/doubled updates, RSS"
    )
    lt.add_argument("--groups", type=int, default=32, help="concurrent groups; each keeps one stream open per shard")
    lt.add_argument("--seconds", type=float, default=10.0, help="how long to send")
    lt.add_argument("--mb", type=float, default=1.0, help="MB of values per shard")
    lt.add_argument("--json", action="store_true", help="one line of JSON")
    lt.set_defaults(run=_loadtest)

    b = sub.add_parser("bench", help="samples/s of psfw against single-process JAX")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--steps", type=int, default=60, help="measured steps per variant")
    b.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    b.add_argument("--rounds", type=int, default=3, help="side-by-side rounds; each figure is its best round")
    b.add_argument("--path", choices=("auto", "tcp"), default="auto", help="tcp: force the network path everywhere")
    b.add_argument("--transfer", metavar="SIZE", help="push + pull of a model of SIZE (e.g. 256MiB): GB/s each way")
    b.add_argument("--scale", action="store_true", help="updates/s of simulated stubs against 1, 2 and 4 shards")
    b.add_argument("--memory", metavar="SIZE", help="train a model of SIZE (e.g. 1GiB): shard peak RSS vs values")
    b.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from psfw.allocator import tune_malloc

    tune_malloc()  # before any thread starts: see psfw/allocator.py
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("psfw").setLevel(logging.INFO)  # psfw's own notes (transport, restores) are shown
    try:
        return args.run(args)
    except ConfigError as err:
        say(f"psfw: config error: {err}")
        return 2
    except PsfwError as err:
        say(f"psfw: {err}")
        return 1
    except KeyboardInterrupt:
        say("psfw: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
