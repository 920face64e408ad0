"""The net structure as a graph, in networkx node-link JSON, and its picture.

Nodes are the model's layers (in data-flow order), its parameters (with their owner
worker) and the shards; links run layer -> layer (data), parameter -> layer (used by)
and parameter -> shard (slices held). This is what SINGA wrote under
``workspace/visualization``, plus the partition.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx


def default_layers(param_names: list[str]) -> list[dict[str, Any]]:
    """One layer per top-level parameter group, in tree order (for user models
    that describe no layers)."""
    groups: dict[str, list[str]] = {}
    for name in param_names:
        groups.setdefault(name.split("/")[0], []).append(name)
    return [{"name": g, "type": "block", "params": ps} for g, ps in groups.items()]


ENDS = ("input", "loss")  # layer names that may stand alone with no parameters


def check_layers(layers: Sequence[Any], param_names: list[str]) -> list[dict[str, Any]]:
    """A model's ``layers`` in the form ``net_graph`` takes, checked against its
    parameter names.

    Each entry is a layer name, which uses the parameters under that name
    (``"hidden"``: ``hidden/w``, ``hidden/b``; none for ``"input"`` and ``"loss"``, and
    a name with no parameters under it is refused), or a dict with
    ``name``, optional ``type`` and ``params`` (parameter names) and any other
    JSON attributes. Raises ValueError naming the entry that is wrong.
    """
    if not isinstance(layers, list | tuple):
        raise ValueError(f"layers must be a list of layer names or dicts, got {type(layers).__name__}")
    known = set(param_names)
    checked: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            uses = [n for n in param_names if n == layer or n.startswith(f"{layer}/")]
            if not uses and layer not in ENDS:  # a misspelt group would draw a layer with no parameters
                groups = sorted({n.split("/")[0] for n in param_names})
                raise ValueError(
                    f"layers[{i}] ({layer}): names no parameter group (the model has {', '.join(groups[:8]) or 'none'}"
                    f"{', ...' if len(groups) > 8 else ''}): give a dict {{'name': {layer!r}, 'params': []}} "
                    "for a layer without parameters"
                )
            layer = {"name": layer, "type": "layer", "params": uses}
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str) or not layer["name"]:
            raise ValueError(
                f"layers[{i}]: {layer!r} is not a layer: give its name, or a dict with 'name' (and 'type', 'params')"
            )
        where = f"layers[{i}] ({layer['name']})"
        params = layer.get("params", [])
        if not isinstance(params, list | tuple) or not all(isinstance(p, str) for p in params):
            raise ValueError(f"{where}: params must be a list of parameter names, got {params!r}")
        unknown = [p for p in params if p not in known]
        if unknown:
            listed = ", ".join(param_names[:8]) + (", ..." if len(param_names) > 8 else "")
            raise ValueError(f"{where}: no parameter named {', '.join(unknown)} (the model has {listed})")
        try:
            json.dumps(layer)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: its attributes must be JSON values (str, numbers, lists, dicts)") from None
        checked.append({**layer, "params": list(params)})
    return checked


def net_graph(layers: list[dict[str, Any]], partition: dict[str, Any]) -> nx.DiGraph:
    """The graph of layers, parameters and shards described above."""
    graph = nx.DiGraph(name="psfw net", shards=partition["shards"])
    previous = None
    for layer in layers:
        # layers may share a name (two "relu"s): each is a node of its own
        node, count = f"layer:{layer['name']}", 1
        while node in graph:
            count += 1
            node = f"layer:{layer['name']}#{count}"
        attrs = {k: v for k, v in layer.items() if k not in ("name", "params")}
        graph.add_node(node, **{**attrs, "kind": "layer", "label": layer["name"]})
        if previous is not None:
            graph.add_edge(previous, node, kind="data")
        previous = node
        for param in layer.get("params", []):
            graph.add_edge(f"param:{param}", node, kind="uses")
        if "table" in layer:
            graph.add_edge(f"table:{layer['table']}", node, kind="uses")
    for shard in range(partition["shards"]):
        graph.add_node(f"shard:{shard}", kind="shard", label=f"shard {shard}", bytes=partition["shard_bytes"][shard])
    for p in partition["params"]:
        node = f"param:{p['name']}"
        graph.add_node(
            node, kind="param", label=p["name"], shape=p["shape"], dtype=p["dtype"], owner_worker=p["owner_worker"]
        )
        for s in p["slices"]:
            shard = f"shard:{s['shard']}"
            if graph.has_edge(node, shard):
                graph.edges[node, shard]["slices"].append(s["index"])
            else:
                graph.add_edge(node, shard, kind="held_by", slices=[s["index"]])
    for t in partition.get("tables", []):  # an embedding table: rows on every shard, by id
        node = f"table:{t['name']}"
        graph.add_node(node, kind="table", label=t["name"], rows=t["rows"], dim=t["dim"])
        for shard in range(partition["shards"]):
            rows = _shard_rows(t, shard, partition["shards"])
            held = graph.nodes[f"shard:{shard}"]
            held.setdefault("table_rows", {})[t["name"]] = rows
            if isinstance(rows, int):  # float32 rows; an optimizer's state comes on top
                held["table_bytes"] = held.get("table_bytes", 0) + rows * t["dim"] * 4
            if rows != 0:
                graph.add_edge(node, f"shard:{shard}", kind="held_by", rows=rows)
    return graph


def _shard_rows(table: dict[str, Any], shard: int, shards: int) -> int | str:
    """The rows of ``table`` that ``shard`` holds: counted (``shard_rows``), about an
    even share of a table too large to count, or "by id" for an unbounded table."""
    if table.get("shard_rows") is not None:
        return table["shard_rows"][shard]
    if table["rows"] is None:
        return "by id"
    return f"about {table['rows'] // shards}"


def node_link(graph: nx.DiGraph) -> dict[str, Any]:
    return nx.node_link_data(graph, edges="links")


ROW_INCHES = 0.42  # the height of a row of nodes: a two-line label at 7 pt and its box


def draw(graph: nx.DiGraph) -> Any:
    """The picture of ``graph`` as a matplotlib figure: layers in a column on the left,
    parameters in the middle coloured by owner worker, shards on the right. Every node
    is a box around its label (the parameter's name and shape, the shard's bytes), so
    a label always fits its node; the arrows end at the boxes' edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, list[str]] = {"layer": [], "param": [], "shard": []}
    for n, d in graph.nodes(data=True):
        kinds["param" if d["kind"] == "table" else d["kind"]].append(n)  # a table sits among the parameters
    span = max(len(nodes) for nodes in kinds.values()) or 1
    fig, ax = plt.subplots(figsize=(11, max(4.0, ROW_INCHES * span + 1.5)))
    ax.set(xlim=(-0.6, 2.6), ylim=(-span - 0.2, 0.2))
    ax.axis("off")
    owners = sorted({graph.nodes[n]["owner_worker"] for n in kinds["param"] if graph.nodes[n]["kind"] == "param"})
    cmap = plt.get_cmap("tab10")
    boxes = {}
    for x, kind in enumerate(kinds):
        nodes = kinds[kind]
        gap = span / max(len(nodes), 1)
        for i, n in enumerate(nodes):
            d = graph.nodes[n]
            if d["kind"] == "table":
                rows = "any" if d["rows"] is None else f"{d['rows']:,}"
                label, color = f"{d['label']} (table)\n{rows} x {d['dim']}, all shards", "#e3e3e3"
            elif kind == "param":
                label = f"{d['label']}\n{'x'.join(map(str, d['shape'])) or 'scalar'}"
                color = (*cmap(owners.index(d["owner_worker"]) % 10)[:3], 0.35)
            elif kind == "shard":
                label, color = f"{d['label']}\n{shard_label(d)}", "#f5e0c3"
            else:
                label, color = d["label"], "#d9e7f5"
            boxes[n] = ax.text(
                x, -(i + 0.5) * gap, label, ha="center", va="center", fontsize=7, zorder=3,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": color, "edgecolor": "#555555"},
            )  # fmt: skip
    styles = {"data": ("-", 0.8), "uses": (":", 0.6), "held_by": ("--", 0.45)}
    for u, v, d in graph.edges(data=True):
        style, alpha = styles[d["kind"]]
        ax.annotate(
            "", xy=boxes[v].get_position(), xytext=boxes[u].get_position(), zorder=1,
            arrowprops={"arrowstyle": "-|>", "linestyle": style, "alpha": alpha, "color": "#333333",
                        "patchA": boxes[u].get_bbox_patch(), "patchB": boxes[v].get_bbox_patch(),
                        "shrinkA": 2, "shrinkB": 2, "linewidth": 0.8},
        )  # fmt: skip
    for i, owner in enumerate(owners):
        ax.scatter([], [], color=cmap(i % 10), alpha=0.5, marker="s", label=f"owned by worker {owner}")
    if owners:  # a model with all its parameters in tables has no owners to show
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(owners), fontsize=8, frameon=False)
    ax.set_title("net structure (left), parameters by owner (middle), shards (right)", fontsize=9)
    fig.tight_layout()
    return fig


def shard_label(shard: dict[str, Any]) -> str:
    """``4 B dense\n+ 5,438 table rows (0.37 MB)``: what a shard holds."""
    label = _size(shard["bytes"])
    if "table_rows" not in shard:
        return label
    counted = [n for n in shard["table_rows"].values() if isinstance(n, int)]
    label += " dense"
    if counted:
        label += f"\n+ {sum(counted):,} table rows ({_size(shard.get('table_bytes', 0))})"
    others = [n for n in shard["table_rows"].values() if not isinstance(n, int)]
    if others:
        label += "\n+ " + ", ".join(f"rows {n}" if n == "by id" else f"{n} rows" for n in sorted(set(others)))
    return label


def _size(count: int) -> str:
    """``0.37 MB``; a size under 10 kB in bytes (``4 B``), which 0.00 MB would hide."""
    return f"{count / 1e6:.2f} MB" if count >= 10_000 else f"{count:,} B"


def render(graph: nx.DiGraph, path: str | Path) -> None:
    """Draw ``graph`` (see ``draw``) and save it as PNG."""
    import matplotlib.pyplot as plt

    fig = draw(graph)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
