"""``python -m psfw.cli``: the psfw command."""

from psfw.cli.main import entry

entry()
