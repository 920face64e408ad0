"""The net structure a run writes: a model's ``layers`` are checked before training,
and the files written at the very end never cost the run its other outputs."""

import json

import pytest

from psfw.compute.netgraph import check_layers, net_graph
from psfw.jobs import outputs
from psfw.protocol.layout import plan_layout

NAMES = ["hidden/w", "hidden/b", "out/w", "out/b"]


def test_layer_names_use_the_parameters_under_their_name():
    layers = check_layers(["input", "hidden", "out"], NAMES)
    assert [(layer["name"], layer["params"]) for layer in layers] == [
        ("input", []),
        ("hidden", ["hidden/w", "hidden/b"]),
        ("out", ["out/w", "out/b"]),
    ]


def test_layer_dicts_keep_their_attributes():
    layer = {"name": "hidden", "type": "dense", "units": 64, "kind": "mine", "params": ("hidden/w",)}
    assert check_layers([layer], NAMES) == [{**layer, "params": ["hidden/w"]}]


@pytest.mark.parametrize(
    ("layers", "fragment"),
    [
        ("hidden", "layers must be a list"),
        ([3], "layers[0]: 3 is not a layer"),
        ([{"type": "dense"}], "layers[0]: {'type': 'dense'} is not a layer"),
        ([{"name": "h", "params": "hidden/w"}], "layers[0] (h): params must be a list"),
        (["input", {"name": "h", "params": ["nope"]}], "layers[1] (h): no parameter named nope"),
        ([{"name": "h", "size": object()}], "layers[0] (h): its attributes must be JSON values"),
    ],
)
def test_bad_layers_are_refused_naming_the_entry(layers, fragment):
    with pytest.raises(ValueError) as err:
        check_layers(layers, NAMES)
    assert fragment in str(err.value)


def test_a_failing_picture_costs_the_run_no_other_output(tmp_path, monkeypatch, caplog):
    def broken(graph, path):
        raise RuntimeError("no display")

    monkeypatch.setattr(outputs, "render", broken)
    layout = plan_layout({n: ((4,), "float32") for n in NAMES}, 2, 1, 1 << 20)
    outputs.write_net(tmp_path, check_layers(["hidden", "out"], NAMES), layout)
    assert json.loads((tmp_path / "partition.json").read_text())["shards"] == 2
    assert {n["id"] for n in json.loads((tmp_path / "net.json").read_text())["nodes"]} >= {"layer:hidden", "layer:out"}
    assert "could not be written" in caplog.text and "no display" in caplog.text


def test_layers_of_the_same_name_are_nodes_of_their_own():
    layers = check_layers(["hidden", {"name": "relu"}, "out", {"name": "relu"}], NAMES)
    layout = plan_layout({n: ((4,), "float32") for n in NAMES}, 1, 1, 1 << 20)
    graph = net_graph(layers, layout.to_json())
    assert [n for n in graph if n.startswith("layer:")] == ["layer:hidden", "layer:relu", "layer:out", "layer:relu#2"]
    assert graph.has_edge("layer:out", "layer:relu#2") and graph.nodes["layer:relu#2"]["label"] == "relu"


def test_a_layer_named_like_a_renamed_one_is_still_a_node_of_its_own():
    layers = check_layers([{"name": "relu"}, {"name": "relu"}, {"name": "relu#2"}], NAMES)
    graph = net_graph(layers, plan_layout({n: ((4,), "float32") for n in NAMES}, 1, 1, 1 << 20).to_json())
    assert len([n for n in graph if n.startswith("layer:")]) == 3
    assert not any(graph.has_edge(n, n) for n in graph)
