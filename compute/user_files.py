"""A user's own Python file (a model, a data reader), imported by its path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def import_user_file(path: Path, what: str) -> ModuleType:
    """The module of the Python file ``path`` (``what``: ``model`` or ``data``, in its
    module name); ValueError in one line when importing it fails."""
    spec = importlib.util.spec_from_file_location(f"psfw_user_{what}_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python file psfw can import: give a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: say what broke, in one line
        raise ValueError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    return module
