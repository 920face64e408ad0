"""The flags of the ``psfw`` command: value types that say what was wrong, flags
that also come from ``PSFW_*`` variables, and help that shows both."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from psfw.base.errors import UsageError

# -- flags that also come from PSFW_* variables ---------------------------------


class FromEnv(NamedTuple):
    """A flag's default: the variable ``PSFW_<name>`` when set and not empty, else
    ``fallback``. Read when the command's arguments are parsed, so a bad value of
    one command's variable never breaks another command (or ``--help``)."""

    name: str
    convert: Callable[[str], Any]
    fallback: Any


def env(name: str, convert: Callable[[str], Any] = str, fallback: Any = None) -> FromEnv:
    return FromEnv(name, convert, fallback)


class HelpWithDefaults(argparse.HelpFormatter):
    """``--help`` gives each flag's default, and the ``PSFW_*`` variable it also
    comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "%(default)" in text or default == argparse.SUPPRESS:
            return text
        if isinstance(default, FromEnv):
            if default.fallback is None or default.fallback is False:
                return f"{text} (or $PSFW_{default.name})"
            shown = f"{default.fallback}, or $PSFW_{default.name}"
        elif default is None or default is False or isinstance(default, list):
            return text
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that resolves FromEnv defaults; a bad value is one line
    that names the variable (exit 2). Its help shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        for dest, value in list(vars(namespace).items()):
            if isinstance(value, FromEnv):
                setattr(namespace, dest, self._resolve(value))
        return namespace, extras

    def _resolve(self, default: FromEnv) -> Any:
        raw = os.environ.get(f"PSFW_{default.name}", "")
        if not raw.strip():
            return default.fallback
        try:
            return default.convert(raw)
        except (ValueError, argparse.ArgumentTypeError) as err:
            self.exit(2, f"{self.prog}: PSFW_{default.name}={raw!r}: {err}\n")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {text!r}")
        return value

    return integer


def link_port(text: str) -> int | None:
    """A shard's link port: a whole number from 0 to 65535 (0: any free port), or
    ``off`` (None: no TCP port; clients of this host still use its Unix socket)."""
    if text.strip().lower() == "off":
        return None
    return integer(0, 65535)(text)


def checkpoint_step(text: str) -> int | str:
    """A checkpoint's step (a whole number of at least 0), or ``best``: the one kept
    by ``train.keep_best``."""
    if text.strip().lower() == "best":
        return "best"
    try:
        return integer(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a step (a whole number of at least 0) or best, got {text!r}"
        ) from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds (a number of at least 0), got {text!r}")
    return value


def positive_number(what: str) -> Callable[[str], float]:
    def positive(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected {what} (a number above 0), got {text!r}")
        return value

    return positive


positive_seconds = positive_number("seconds")


def switch(text: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    value = words.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError("expected 1 or 0 (or true/false, yes/no, on/off)")
    return value


def one_of(*choices: str) -> Callable[[str], str]:
    def one_of(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}")
        return text

    return one_of


def shard_addresses(text: str, listed: str = "--servers lists") -> list[str]:
    """``host:port,host:port`` -> the addresses; UsageError for one without a port
    (gRPC would quietly try port 443) or one given twice (two places, one shard);
    ``listed``: what the user gave them as, for the message."""
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    for i, address in enumerate(addresses):
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise UsageError(f"shard address {address!r} is not host:port (e.g. 127.0.0.1:50051, [::1]:50051)")
        if address in addresses[:i]:
            raise UsageError(f"{listed} {address} twice: give each shard's address once, in the order of their --shard")
    return addresses


def listen_address(text: str) -> str:
    """Check an address to listen on: ``host:port`` with a port from 0 to 65535 (0:
    any free port), an IPv6 host in brackets (``[::]:50051``). Returns it as given;
    raises ValueError saying what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not re.fullmatch(r"[0-9]+", port):
        raise ValueError(f"listen address {text!r} is not host:port (e.g. 0.0.0.0:50051, [::]:50051, 127.0.0.1:0)")
    if int(port) > 65535:
        raise ValueError(f"listen address {text!r}: port {port} is outside 0-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"listen address {text!r}: {host} is not an IPv6 address") from None
    elif not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        hint = " (write an IPv6 host in brackets: [::1]:50051)" if ":" in host else ""
        raise ValueError(f"listen address {text!r}: {host!r} is not a host name or IP address{hint}")
    return text


def add_overrides(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``: a config key overridden (repeatable)."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable): --set train.epochs=5 --set optimizer.learning_rate=3e-4; "
        "the value is a TOML value, else text; an empty value removes the key (--set train.epochs=)",
    )
