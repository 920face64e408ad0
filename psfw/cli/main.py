"""The ``psfw`` command: train, eval, predict, generate, export, server, worker, launch, status, health, bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from psfw.base.console import StderrHandler, say
from psfw.base.errors import ConfigError, PsfwError, UsageError
from psfw.cli.flags import parser
from psfw.jobs.stopping import last_words
from psfw.runtime.threads import cause_of


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
