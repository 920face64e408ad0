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


def check_layers(layers: Sequence[Any], param_names: list[str]) -> list[dict[str, Any]]:
    """A model's ``layers`` in the form ``net_graph`` takes, checked against its
    parameter names.

    Each entry is a layer name, which uses the parameters under that name
    (``"hidden"``: ``hidden/w``, ``hidden/b``; none for ``"input"``), or a dict with
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
    return graph


def node_link(graph: nx.DiGraph) -> dict[str, Any]:
    return nx.node_link_data(graph, edges="links")


def render(graph: nx.DiGraph, path: str | Path) -> None:
    """Draw layers in a column, parameters beside them coloured by owner worker, and
    shards on the right; save as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n, d in graph.nodes(data=True) if d["kind"] == "layer"]
    params = [n for n, d in graph.nodes(data=True) if d["kind"] == "param"]
    shards = [n for n, d in graph.nodes(data=True) if d["kind"] == "shard"]
    span = max(len(layers), len(params), len(shards), 1)

    def column(nodes: list[str], x: float) -> dict[str, tuple[float, float]]:
        gap = span / max(len(nodes), 1)
        return {n: (x, -(i + 0.5) * gap) for i, n in enumerate(nodes)}

    pos = {**column(layers, 0.0), **column(params, 1.6), **column(shards, 3.2)}
    height = max(4.0, 0.6 * span + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    owners = sorted({graph.nodes[n]["owner_worker"] for n in params})
    cmap = plt.get_cmap("tab10")
    colors = {"layer": "#d9e7f5", "shard": "#f5e0c3"}
    node_colors = [
        cmap(owners.index(graph.nodes[n]["owner_worker"]) % 10) if n in params else colors[graph.nodes[n]["kind"]]
        for n in graph.nodes
    ]
    styles = {"data": "-", "uses": ":", "held_by": "--"}
    for kind, style in styles.items():
        edges = [(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == kind]
        nx.draw_networkx_edges(graph, pos, edgelist=edges, style=style, ax=ax, arrows=True, alpha=0.6, node_size=900)
    nx.draw_networkx_nodes(graph, pos, node_color=node_colors, node_size=900, ax=ax, edgecolors="#555555")
    labels = {}
    for n, d in graph.nodes(data=True):
        if d["kind"] == "param":
            labels[n] = f"{d['label']}\n{'x'.join(map(str, d['shape']))}"
        elif d["kind"] == "shard":
            labels[n] = f"{d['label']}\n{d['bytes'] / 1e6:.2f} MB"
        else:
            labels[n] = d["label"]
    nx.draw_networkx_labels(graph, pos, labels=labels, font_size=7, ax=ax)
    for i, owner in enumerate(owners):
        ax.scatter([], [], color=cmap(i % 10), label=f"owned by worker {owner}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=max(len(owners), 1), fontsize=8, frameon=False)
    ax.set_title("net structure (left), parameters by owner (middle), shards (right)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
