"""The ``psfw`` command: train, eval, predict, generate, server, worker, launch, status, health, bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from psfw.base.console import StderrHandler, say
from psfw.base.errors import ConfigError, PsfwError, UsageError
from psfw.cli import commands
from psfw.cli.arguments import (
    Parser,
    checkpoint_step,
    data_port,
    env,
    integer,
    listen_address,
    one_of,
    positive_number,
    positive_seconds,
    seconds,
    switch,
)
from psfw.jobs.stopping import last_words
from psfw.runtime.threads import cause_of
from psfw.version import __version__


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable): --set train.epochs=5 --set optimizer.learning_rate=3e-4; "
        "the value is a TOML value, else text; an empty value removes the key (--set train.epochs=)",
    )


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
    p = Parser(prog="psfw", description="asyncio parameter server for data-parallel JAX training")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument("--version", action="version", version=f"psfw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config end to end on this machine (embedded shards)")
    t.add_argument("config", help="TOML config, e.g. examples/digits_mlp.toml")
    _add_overrides(t)
    t.add_argument("--run-dir", help="folder for the outputs (default: a new folder under runs/)")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    _add_overwrite(t)
    t.add_argument(
        "--change-optimizer",
        action="store_true",
        help="with --resume: go on with the config's new optimizer settings (a lower learning rate, say), keeping "
        "the optimizer state; recorded in history.jsonl with the step",
    )
    t.set_defaults(run=commands.run_train)

    ev = sub.add_parser("eval", help="evaluate what a run trained on the test split of a config")
    ev.add_argument("config", help="TOML config whose model and test split to use (e.g. the run's own)")
    _add_overrides(ev)
    _add_trained_run(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument(
        "--input", help="evaluate on this .npz file's x_test and y_test (or x and y) instead of the config's test split"
    )
    ev.set_defaults(run=commands.run_eval)

    pr = sub.add_parser("predict", help="what a run's model answers for new rows (class probabilities, values)")
    pr.add_argument("config", help="TOML config whose model to use (e.g. the run's own)")
    _add_overrides(pr)
    _add_trained_run(pr)
    pr.add_argument(
        "--input", help="rows to predict: a .npy file, or an .npz file with x (default: the config's test split)"
    )
    pr.add_argument(
        "--output",
        help="where to write the predictions: FILE.npy (a classifier's classes beside it, FILE-class.npy), or "
        "FILE.npz with predictions and class (default: RUN_DIR/predictions.npy)",
    )
    pr.set_defaults(run=commands.run_predict)

    ge = sub.add_parser("generate", help="text from a run's byte-level language model (examples/lm.toml)")
    ge.add_argument("config", help="the language model's TOML config (e.g. the run's own)")
    _add_overrides(ge)
    _add_trained_run(ge)
    ge.add_argument("--prompt", required=True, help="the text to go on from")
    ge.add_argument("--bytes", type=integer(1), default=200, help="how many bytes to write after the prompt")
    ge.add_argument(
        "--temperature", type=float, default=0.8, help="below 1: likelier bytes; 0: always the most probable"
    )
    ge.add_argument("--seed", type=integer(0), default=0, help="the seed of the draws")
    ge.set_defaults(run=commands.run_generate)

    s = sub.add_parser(
        "server",
        help="serve one parameter-server shard",
        description="Serve one shard. Every flag can also come from the environment (PSFW_SHARD, PSFW_SHARDS, "
        "PSFW_LISTEN, PSFW_GRACE, PSFW_DRAIN, PSFW_METRICS_PORT, PSFW_DATA_PORT, PSFW_NONFINITE, PSFW_CHECKPOINT_DIR, "
        "PSFW_TLS_CERT, PSFW_TLS_KEY, PSFW_TLS_CLIENT_CA, PSFW_TOKEN_FILE, PSFW_INSECURE=1), "
        "so a container needs no arguments.",
    )
    index, count, port = integer(0), integer(1), integer(0, 65535)
    s.add_argument("--shard", type=index, default=env("SHARD", index, 0), help="this shard's index")
    s.add_argument("--of", type=count, default=env("SHARDS", count, 1), help="how many shards the cluster has")
    s.add_argument(
        "--listen",
        default=env("LISTEN", listen_address, "127.0.0.1:50051"),
        help="address to listen on, host:port (port 0: any free port)",
    )
    s.add_argument(
        "--grace", type=seconds, default=env("GRACE", seconds, 5.0), help="seconds in-flight RPCs get on shutdown"
    )
    s.add_argument(
        "--drain", type=seconds, default=env("DRAIN", seconds, 0.0), help="seconds NOT_SERVING before stopping"
    )
    s.add_argument(
        "--metrics-port",
        type=port,
        default=env("METRICS_PORT", port),
        help="serve Prometheus metrics on this HTTP port",
    )
    s.add_argument(
        "--data-port",
        type=data_port,
        default=env("DATA_PORT", data_port, 0),
        help="TCP port of the data link, where clients on the network path send tensors beside gRPC "
        "(0: any free port; off: none, everything over gRPC; never with TLS)",
    )
    nonfinite = ("reject", "skip")
    s.add_argument(
        "--nonfinite",
        choices=nonfinite,
        default=env("NONFINITE", one_of(*nonfinite), "reject"),
        help="NaN/Inf gradient policy",
    )
    s.add_argument(
        "--checkpoint-dir",
        default=env("CHECKPOINT_DIR"),
        help="folder shared by the job's shards for checkpoints; the newest complete one is loaded at start",
    )
    s.add_argument("--tls-cert", default=env("TLS_CERT"), help="server certificate (PEM): turns on TLS")
    s.add_argument("--tls-key", default=env("TLS_KEY"), help="server private key (PEM)")
    s.add_argument(
        "--tls-client-ca", default=env("TLS_CLIENT_CA"), help="require client certificates signed by this CA (mTLS)"
    )
    s.add_argument("--token-file", default=env("TOKEN_FILE"), help="require this bearer token on every RPC but health")
    s.add_argument(
        "--ready-file",
        help="once serving, write a JSON record with the bound address to this file (for a supervisor)",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        default=env("INSECURE", switch, False),
        help="allow a non-loopback address without TLS (a token alone would cross the network in clear)",
    )
    s.set_defaults(run=commands.run_server)

    w = sub.add_parser("worker", help="run one worker process of a cluster against running shards")
    w.add_argument("config", help="the job's TOML config (the same for every process)")
    _add_overrides(w)
    w.add_argument("--process", type=index, default=env("PROCESS", index, 0), help="this process's index")
    w.add_argument(
        "--servers", default=env("SERVERS", str, ""), help="shard addresses host:port, comma-separated, in shard order"
    )
    w.add_argument("--run-dir", default=env("RUN_DIR"), help="outputs folder (process 0 evaluates and writes)")
    w.add_argument(
        "--resume",
        action="store_true",
        default=env("RESUME", switch, False),
        help="continue the job the shards hold where they hold it (a restarted process; without it, a process "
        "whose group has advanced on the shards is refused)",
    )
    _add_overwrite(w, "records, config, parameters, pictures; not the shards' checkpoints")
    w.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # psfw launch's child
    _add_client_security(w)
    w.set_defaults(run=commands.run_worker)

    la = sub.add_parser("launch", help="run the shards and worker processes of a config as OS processes here")
    la.add_argument("config", help="TOML config")
    _add_overrides(la)
    la.add_argument("--run-dir", help="folder for the outputs (default: a new folder under runs/)")
    la.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    _add_overwrite(la)
    la.set_defaults(run=commands.run_launch)

    st = sub.add_parser("status", help="a running cluster's shards: keys, bytes, versions, groups, update rate")
    st.add_argument("servers", help="shard addresses host:port, comma-separated")
    st.add_argument(
        "--interval", type=seconds, default=1.0, help="seconds over which to measure the update rate (0: no rate)"
    )
    _add_client_security(st)
    st.set_defaults(run=commands.run_status)

    h = sub.add_parser("health", help="probe a shard's gRPC health service (exit 0 when SERVING)")
    h.add_argument("address", help="host:port of the shard")
    h.add_argument("--service", default="", help="service name ('' = the whole server)")
    h.add_argument("--timeout", type=positive_seconds, default=5.0, help="seconds to wait for the answer")
    h.add_argument(
        "--local",
        action="store_true",
        help="probe the shard that runs next to this command with the shard's own settings (the image's "
        "HEALTHCHECK): --tls-cert/--tls-key (PSFW_TLS_CERT/PSFW_TLS_KEY, as the shard reads them) are the shard's; "
        "trust that certificate under the name it carries and present it to a shard that requires client "
        "certificates",
    )
    _add_client_security(h)
    h.set_defaults(run=commands.run_health)

    lt = sub.add_parser(
        "loadtest", help="concurrent streams against 2 shard processes: errors, lost/doubled updates, RSS"
    )
    lt.add_argument(
        "--groups", type=integer(1), default=32, help="concurrent groups; each keeps one stream open per shard"
    )
    lt.add_argument("--seconds", type=positive_seconds, default=10.0, help="how long to send")
    lt.add_argument("--mb", type=positive_number("MB"), default=1.0, help="MB of values per shard")
    lt.add_argument("--json", action="store_true", help="one line of JSON")
    lt.set_defaults(run=commands.run_loadtest)

    b = sub.add_parser("bench", help="samples/s of psfw against single-process JAX")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--steps", type=int, default=60, help="measured steps per variant")
    b.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    b.add_argument("--rounds", type=int, default=3, help="side-by-side rounds; each figure is its best round")
    b.add_argument("--path", choices=("auto", "grpc"), default="auto", help="grpc: force the network path everywhere")
    b.add_argument("--transfer", metavar="SIZE", help="push + pull of a model of SIZE (e.g. 256MiB): GB/s each way")
    b.add_argument("--scale", action="store_true", help="updates/s of simulated stubs against 1, 2 and 4 shards")
    b.add_argument("--memory", metavar="SIZE", help="train a model of SIZE (e.g. 1GiB): shard peak RSS vs values")
    b.add_argument(
        "--sparse",
        action="store_true",
        help="embedding tables: samples/s and bytes per step by table size (with --scale: rows/s by shards; "
        "with --memory SIZE: a table of SIZE over 2 shard processes)",
    )
    b.set_defaults(run=commands.run_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from psfw.runtime.allocator import tune_malloc

    tune_malloc()  # before any thread starts: see psfw/runtime/allocator.py
    args = parser().parse_args(argv)
    handler = StderrHandler()  # lines go above a progress bar, never into it
    # a shard serves on: the traceback of its bug is for its log; elsewhere the
    # command's own last line says what failed
    lines = args.verbose or args.command == "server"
    handler.setFormatter((logging.Formatter if lines else _OneLine)("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("psfw").setLevel(logging.INFO)  # psfw's own notes (transport, restores) are shown
    terminated = []

    def on_sigterm(signum, frame) -> None:
        # stop as on Ctrl-C (a container's stop, psfw launch's stop): asyncio's own
        # Ctrl-C handler cancels the job, which closes channels and removes
        # shared-memory regions; without one (SIGINT ignored), interrupt directly
        terminated.append(signum)
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):
            raise KeyboardInterrupt
        on_sigint(signum, frame)  # a second one stops at once, with the signal's exit status

    in_main = threading.current_thread() is threading.main_thread()
    last_words(lambda signum: f"psfw: {_stopped(signum)} again: stopped at once{_hint(args)}")
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None  # server and launch set their own
    try:
        return args.run(args)
    except ConfigError as err:
        say(f"psfw: config error: {err}")
        return 2
    except UsageError as err:  # a flag or a run folder that cannot work: say which, as argparse would
        say(f"psfw {args.command}: {err}")
        return 2
    except PsfwError as err:
        say(f"psfw: {err}")
        return 1
    except Exception as err:  # one that psfw did not name (a model failing in the final evaluation)
        if args.verbose:
            raise
        say(f"psfw {args.command}: failed: {cause_of(err)} (-v shows where)")
        return 1
    except KeyboardInterrupt:
        if terminated:
            say(f"psfw: terminated (SIGTERM){_hint(args)}")
            return 128 + signal.SIGTERM
        say(f"psfw: interrupted{_hint(args)}")
        return 130
    finally:
        last_words(None)
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _stopped(signum: int) -> str:
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


def _hint(args: argparse.Namespace) -> str:
    """``; to continue, ...``: what the command says to do after a stop, if anything."""
    hint = getattr(args, "on_interrupt", None)
    return f"; {hint()}" if hint is not None else ""


class _OneLine(logging.Formatter):
    """A log record in one line: a traceback only with ``-v``."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None}))


def entry() -> None:
    """The ``psfw`` command: ``main`` and its exit status. A stop may leave a worker's
    thread in a long computation (``psfw.runtime.worker``); the OS process ends without
    waiting for it, all said and written."""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
