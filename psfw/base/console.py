"""Lines for a terminal or a log that several psfw OS processes share.

``print(text, file=...)`` writes the text and its newline in two pieces, so two
processes (the shards of one host, a launcher's workers) can cut each other's lines;
``say`` writes a whole line at once.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and its newline in one write, then flush (default: stderr)."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()


class StderrHandler(logging.StreamHandler):
    """A log handler that writes to ``sys.stderr`` as it is when a record comes, not
    as it was when the handler was made: while a progress bar runs, rich points
    ``sys.stderr`` at its console, which writes the line above the bar instead of
    into it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # the base class sets it; the property always answers
        pass
