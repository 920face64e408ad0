"""Lines for a terminal or a log that several psfw processes share.

``print(text, file=...)`` writes the text and its newline in two pieces, so two
processes (the shards of one host, a launcher's workers) can cut each other's lines;
``say`` writes a whole line at once.
"""

from __future__ import annotations

import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and its newline in one write, then flush (default: stderr)."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
