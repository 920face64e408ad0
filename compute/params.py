"""Parameter names from pytree paths: ``{"dense0": {"w": ...}}`` -> ``"dense0/w"``."""

from __future__ import annotations

from typing import Any

import jax

Params = Any  # arbitrary nests of arrays


def _part(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_params(tree: Params) -> tuple[dict[str, Any], Any]:
    """Flat ``{name: leaf}`` in tree order, plus the treedef to rebuild the tree.

    Raises ValueError when two leaves get the same name.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for path, leaf in leaves:
        name = "/".join(_part(p) for p in path) or "param"
        if name in flat:
            raise ValueError(f"two parameters are both named {name!r}: rename one of them")
        flat[name] = leaf
    return flat, treedef


def unflatten_params(treedef: Any, names: list[str], flat: dict[str, Any]) -> Params:
    """Rebuild the tree from a flat dict with the names in tree order."""
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
