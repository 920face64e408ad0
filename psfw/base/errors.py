"""The errors psfw raises to its users, and a done-callback that marks a future's error as seen."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum

import grpc


class PsfwError(Exception):
    """Base of psfw's errors: its message is one line that says what went wrong and
    what to do (the ``psfw`` command prints it as ``psfw: ...`` and exits 1)."""


class ConfigError(PsfwError, ValueError):
    """A config that cannot run; the message names the file, the field and the
    problem (``job.toml: train.batch_size: ...``). Also a ValueError."""


class UsageError(PsfwError, ValueError):
    """A command used in a way that cannot work, the config aside: a flag, a run
    folder, a worker process that does not exist. The message says what to do
    instead. Also a ValueError."""


class Reason(enum.StrEnum):
    """Why a shard refused, for a program to act on (the message is for people).

    Over gRPC it travels as the ``psfw-reason`` trailing metadata of the status."""

    NONE = ""
    SHARD_WAIT = "shard-wait"  # a wait of the shard's own ran out: an answer, not a lost connection
    NO_SHARED_MEMORY = "no-shared-memory"  # the shard cannot map the client's region: use the network


class ShardError(PsfwError):
    """An RPC to a shard failed.

    Attributes:
        code: the gRPC status code (None where no RPC answered).
        reason: why, where the shard named it (a ``Reason``; ``Reason.NONE`` else).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: Reason = Reason.NONE):
        super().__init__(message)
        self.code = code
        self.reason = reason


class WaitTimeout(PsfwError, TimeoutError):
    """A wait ran past its limit; the message says what it waited for."""


def said(err: BaseException) -> str:
    """An error in a log line: its message, or its kind when it has none."""
    return str(err) or type(err).__name__


def mark_retrieved(future: asyncio.Future | concurrent.futures.Future) -> None:
    """A done callback: the future's exception counts as seen (whoever awaits it gets
    it), so asyncio does not log it again when nobody is left to await it."""
    if not future.cancelled():
        future.exception()


class WireError(Exception):
    """A request or reply that does not match what the receiver expects, or a
    refusal of the shard: a gRPC status code, a message for people and, where a
    program acts on it, a ``Reason``."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason = Reason.NONE):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
