"""The ``psfw`` command's parser: every command and its flags (what each does:
``psfw.cli.commands``; running one: ``psfw.cli.main``)."""

from __future__ import annotations

import argparse
import os

from psfw.cli import commands
from psfw.cli.arguments import (
    Parser,
    add_overrides,
    checkpoint_step,
    env,
    integer,
    link_port,
    listen_address,
    one_of,
    positive_seconds,
    seconds,
    switch,
)
from psfw.cli.tool_flags import add_bench, add_loadtest, add_plan
from psfw.version import __version__


def _add_trained_run(p: argparse.ArgumentParser) -> None:
    """The flags that name what a run trained: its folder, a step, where its checkpoints are."""
    p.add_argument("--run-dir", required=True, help="the run folder whose parameters to use")
    p.add_argument(
        "--step",
        type=checkpoint_step,
        help="use the run's checkpoint of this step, or best (train.keep_best's; default: its final parameters)",
    )
    p.add_argument(
        "--checkpoint-dir",
        help="the shards' --checkpoint-dir of a cluster run, where its checkpoints (and tables) are "
        "(default: RUN_DIR/checkpoints)",
    )


def _add_client_security(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-ca", default=env("TLS_CA"), help="CA certificate that signed the shards' certificates (turns on TLS)"
    )
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="this client's certificate, for mutual TLS")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="this client's private key, for mutual TLS")
    p.add_argument("--token-file", default=env("TOKEN_FILE"), help="file holding the bearer token")


def _add_overwrite(
    p: argparse.ArgumentParser, what: str = "records, config, parameters, pictures, checkpoints"
) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"start the run in --run-dir again: first remove the files psfw wrote there for the earlier run (its "
        f"{what}; nothing else)",
    )


def parser() -> argparse.ArgumentParser:
    """The ``psfw`` command's parser: a sub-parser per command, each with its flags."""
    p = Parser(prog="psfw", description="asyncio parameter server for data-parallel JAX training")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument("--version", action="version", version=f"psfw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_eval,
        _add_predict,
        _add_generate,
        _add_export,
        _add_reshard,
        _add_server,
        _add_worker,
        _add_launch,
        _add_ray,
        _add_status,
        _add_health,
        add_loadtest,
        add_bench,
        add_plan,
    ):
        add(sub)
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``psfw train`` and its flags."""
    p = sub.add_parser("train", help="train a config end to end on this machine (embedded shards)")
    p.add_argument("config", help="TOML config, e.g. examples/digits_mlp.toml")
    add_overrides(p)
    p.add_argument("--run-dir", help="folder for the outputs (default: a new folder under runs/)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    _add_overwrite(p)
    p.add_argument(
        "--change-optimizer",
        action="store_true",
        help="with --resume: go on with the config's new optimizer settings (a lower learning rate, say), keeping "
        "the optimizer state; recorded in history.jsonl with the step",
    )
    p.set_defaults(run=commands.run_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """``psfw eval`` and its flags."""
    p = sub.add_parser("eval", help="evaluate what a run trained on the test split of a config")
    p.add_argument("config", help="TOML config whose model and test split to use (e.g. the run's own)")
    add_overrides(p)
    _add_trained_run(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--input", help="evaluate on this .npz file's x_test and y_test (or x and y) instead of the config's test split"
    )
    p.set_defaults(run=commands.run_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    """``psfw predict`` and its flags."""
    p = sub.add_parser("predict", help="what a run's model answers for new rows (class probabilities, values)")
    p.add_argument("config", help="TOML config whose model to use (e.g. the run's own)")
    add_overrides(p)
    _add_trained_run(p)
    p.add_argument(
        "--input", help="rows to predict: a .npy file, or an .npz file with x (default: the config's test split)"
    )
    p.add_argument(
        "--output",
        help="where to write the predictions: FILE.npy (a classifier's classes beside it, FILE-class.npy), or "
        "FILE.npz with predictions and class (default: RUN_DIR/predictions.npy)",
    )
    p.set_defaults(run=commands.run_predict)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """``psfw generate`` and its flags."""
    p = sub.add_parser("generate", help="text from a run's byte-level language model (examples/lm.toml)")
    p.add_argument("config", help="the language model's TOML config (e.g. the run's own)")
    add_overrides(p)
    _add_trained_run(p)
    p.add_argument("--prompt", required=True, help="the text to go on from")
    p.add_argument("--bytes", type=integer(1), default=200, help="how many bytes to write after the prompt")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="below 1: likelier bytes; 0: always the most probable"
    )
    p.add_argument("--seed", type=integer(0), default=0, help="the seed of the draws")
    p.set_defaults(run=commands.run_generate)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``psfw export`` and its flags."""
    p = sub.add_parser(
        "export", help="write one embedding table's trained rows to a file a serving side reads without psfw"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (a cluster run's: process 0's --run-dir)")
    p.add_argument("--table", required=True, help="the table to export, as the model declares it")
    p.add_argument(
        "--to",
        metavar="FILE",
        help="FILE.safetensors (ids int64 [n], sorted; values float32 [n, dim]) or FILE.npz with the same arrays "
        "(default: RUN_DIR/export/TABLE.safetensors)",
    )
    p.add_argument(
        "--step",
        type=checkpoint_step,
        help="the checkpoint of this step, or best (train.keep_best's; default: the newest complete one, also of a "
        "running job)",
    )
    p.add_argument(
        "--checkpoint-dir",
        help="the shards' --checkpoint-dir of a cluster run, where its tables are (default: RUN_DIR/checkpoints)",
    )
    p.set_defaults(run=commands.run_export)


def _add_reshard(sub: argparse._SubParsersAction) -> None:
    """``psfw reshard`` and its flags."""
    p = sub.add_parser(
        "reshard",
        help="re-cut a run's newest checkpoint for another number of shards (psfw train and launch --resume do it "
        "themselves)",
    )
    p.add_argument("config", help="the job's TOML config: its model and cluster.slice_bytes give the new layout")
    add_overrides(p)
    p.add_argument("--run-dir", help="the run folder whose checkpoints (RUN_DIR/checkpoints) to re-cut")
    p.add_argument("--checkpoint-dir", help="the shards' --checkpoint-dir of a cluster run, instead of --run-dir")
    p.add_argument(
        "--shards",
        type=integer(1),
        help="the number of shards to re-cut it for (default: the config's cluster.servers)",
    )
    p.set_defaults(run=commands.run_reshard)


def _add_server(sub: argparse._SubParsersAction) -> None:
    """``psfw server`` and its flags."""
    p = sub.add_parser(
        "server",
        help="serve one parameter-server shard",
        description="Serve one shard. Every flag can also come from the environment (PSFW_SHARD, PSFW_SHARDS, "
        "PSFW_LISTEN, PSFW_GRACE, PSFW_DRAIN, PSFW_METRICS_PORT, PSFW_LINK_PORT, PSFW_NONFINITE, PSFW_CHECKPOINT_DIR, "
        "PSFW_TLS_CERT, PSFW_TLS_KEY, PSFW_TLS_CLIENT_CA, PSFW_TOKEN_FILE, PSFW_INSECURE=1), "
        "so a container needs no arguments.",
    )
    index, count, port = integer(0), integer(1), integer(0, 65535)
    p.add_argument("--shard", type=index, default=env("SHARD", index, 0), help="this shard's index")
    p.add_argument("--of", type=count, default=env("SHARDS", count, 1), help="how many shards the cluster has")
    p.add_argument(
        "--listen",
        default=env("LISTEN", listen_address, "127.0.0.1:50051"),
        help="address to listen on, host:port (port 0: any free port)",
    )
    p.add_argument(
        "--grace", type=seconds, default=env("GRACE", seconds, 5.0), help="seconds in-flight RPCs get on shutdown"
    )
    p.add_argument(
        "--drain", type=seconds, default=env("DRAIN", seconds, 0.0), help="seconds NOT_SERVING before stopping"
    )
    p.add_argument(
        "--metrics-port",
        type=port,
        default=env("METRICS_PORT", port),
        help="serve Prometheus metrics on this HTTP port",
    )
    p.add_argument(
        "--link-port",
        "--data-port",
        dest="link_port",
        type=link_port,
        default=env("LINK_PORT", link_port, 0),
        help="TCP port of the link, where clients on other hosts send Put, Get and Update beside gRPC, "
        "in TLS when the shard has TLS (0: any free port; off: none, they use gRPC; --data-port is its former name)",
    )
    nonfinite = ("reject", "skip")
    p.add_argument(
        "--nonfinite",
        choices=nonfinite,
        default=env("NONFINITE", one_of(*nonfinite), "reject"),
        help="NaN/Inf gradient policy",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=env("CHECKPOINT_DIR"),
        help="folder shared by the job's shards for checkpoints; the newest complete one is loaded at start",
    )
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="server certificate (PEM): turns on TLS")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="server private key (PEM)")
    p.add_argument(
        "--tls-client-ca", default=env("TLS_CLIENT_CA"), help="require client certificates signed by this CA (mTLS)"
    )
    p.add_argument("--token-file", default=env("TOKEN_FILE"), help="require this bearer token on every RPC but health")
    p.add_argument(
        "--ready-file",
        help="once serving, write a JSON record with the bound address to this file (for a supervisor)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=env("INSECURE", switch, False),
        help="allow a non-loopback address without TLS (a token alone would cross the network in clear)",
    )
    p.set_defaults(run=commands.run_server)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    """``psfw worker`` and its flags."""
    index = integer(0)
    p = sub.add_parser("worker", help="run one worker process of a cluster against running shards")
    p.add_argument("config", help="the job's TOML config (the same for every process)")
    add_overrides(p)
    p.add_argument("--process", type=index, default=env("PROCESS", index, None), help="this process's index (0)")
    p.add_argument(
        "--group",
        type=index,
        default=env("GROUP", index, None),
        help="run every worker process of this group here instead; a group beyond cluster.worker_groups joins "
        "the running job where it stands (up to cluster.max_groups)",
    )
    p.add_argument(
        "--servers", default=env("SERVERS", str, ""), help="shard addresses host:port, comma-separated, in shard order"
    )
    p.add_argument("--run-dir", default=env("RUN_DIR"), help="outputs folder (process 0 evaluates and writes)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=env("RESUME", switch, False),
        help="continue the job the shards hold where they hold it (a restarted process; without it, a process "
        "whose group has advanced on the shards is refused)",
    )
    _add_overwrite(p, "records, config, parameters, pictures; not the shards' checkpoints")
    p.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # psfw launch's child
    _add_client_security(p)
    p.set_defaults(run=commands.run_worker)


def _add_launch(sub: argparse._SubParsersAction) -> None:
    """``psfw launch`` and its flags."""
    p = sub.add_parser("launch", help="run the shards and worker processes of a config as OS processes here")
    p.add_argument("config", help="TOML config")
    add_overrides(p)
    p.add_argument("--run-dir", help="folder for the outputs (default: a new folder under runs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    _add_overwrite(p)
    p.set_defaults(run=commands.run_launch)


def _add_ray(sub: argparse._SubParsersAction) -> None:
    """``psfw ray`` and its flags."""
    p = sub.add_parser(
        "ray",
        help='run the shards and worker processes of a config as Ray actors (pip install "psfw[ray]")',
    )
    p.add_argument("config", help="TOML config")
    add_overrides(p)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="the Ray cluster's head, HOST:PORT, or auto (env RAY_ADDRESS; default: start a Ray instance here)",
    )
    p.add_argument(
        "--run-dir",
        help="folder for the outputs (default: a new folder under runs/); on several nodes, an absolute path that "
        "every node mounts",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    _add_overwrite(p)
    p.set_defaults(run=commands.run_ray)


def _add_status(sub: argparse._SubParsersAction) -> None:
    """``psfw status`` and its flags."""
    p = sub.add_parser("status", help="a running cluster's shards: keys, bytes, versions, groups, update rate")
    p.add_argument("servers", nargs="?", help="shard addresses host:port, comma-separated")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="the shards of the psfw jobs running on the Ray cluster at ADDRESS (HOST:PORT, or auto), instead",
    )
    p.add_argument(
        "--interval", type=seconds, default=1.0, help="seconds over which to measure the update rate (0: no rate)"
    )
    _add_client_security(p)
    p.set_defaults(run=commands.run_status)


def _add_health(sub: argparse._SubParsersAction) -> None:
    """``psfw health`` and its flags."""
    p = sub.add_parser("health", help="probe a shard's gRPC health service (exit 0 when SERVING)")
    p.add_argument("address", help="host:port of the shard")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=positive_seconds, default=5.0, help="seconds to wait for the answer")
    p.add_argument(
        "--local",
        action="store_true",
        help="probe the shard that runs next to this command with the shard's own settings (the image's "
        "HEALTHCHECK): --tls-cert/--tls-key (PSFW_TLS_CERT/PSFW_TLS_KEY, as the shard reads them) are the shard's; "
        "trust that certificate under the name it carries and present it to a shard that requires client "
        "certificates",
    )
    _add_client_security(p)
    p.set_defaults(run=commands.run_health)
