"""The net structure a run writes: a model's ``layers`` are checked before training,
and the files written at the very end never cost the run its other outputs."""

import json

import pytest

from psfw.compute.netgraph import check_layers, default_layers, net_graph
from psfw.jobs import outputs
from psfw.protocol.layout import plan_layout

pytestmark = pytest.mark.unit

NAMES = ["hidden/w", "hidden/b", "out/w", "out/b"]


def test_layer_names_use_the_parameters_under_their_name():
    layers = check_layers(["input", "hidden", "out", "loss"], NAMES)
    assert [(layer["name"], layer["params"]) for layer in layers] == [
        ("input", []),
        ("hidden", ["hidden/w", "hidden/b"]),
        ("out", ["out/w", "out/b"]),
        ("loss", []),
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
        (
            ["input", "hiden", "out", "loss"],
            "layers[1] (hiden): names no parameter group (the model has hidden, out): give a dict "
            "{'name': 'hiden', 'params': []} for a layer without parameters",
        ),
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


@pytest.mark.parametrize(
    "model",
    [
        {"name": "mlp", "hidden": [32] * 20},  # 43 layers, 42 parameters
        {"name": "transformer", "width": 64, "heads": 4, "depth": 2},
    ],
)
def test_every_label_fits_its_node_and_no_two_nodes_overlap(model):
    """Each node is a box around its label; the boxes of a deep net or a
    transformer neither overlap nor leave the picture."""
    import matplotlib.pyplot as plt

    from psfw.compute.netgraph import draw, net_graph
    from psfw.jobs.config import parse_config
    from psfw.jobs.job import build_job

    data = {"name": "stdlib_text", "seq_len": 16} if model["name"] == "transformer" else {"name": "digits"}
    job = build_job(parse_config({"model": model, "data": data, "train": {"steps": 1}}))
    graph = net_graph(job.model.layers, job.layout.to_json())
    fig = draw(graph)
    try:
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        texts = [t for t in fig.axes[0].texts if t.get_bbox_patch() is not None]
        assert len(texts) == graph.number_of_nodes()
        boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in texts]
        labels = [t.get_window_extent(renderer) for t in texts]
        page = fig.bbox
        for text, box, label in zip(texts, boxes, labels):
            assert box.x0 <= label.x0 and label.x1 <= box.x1 and box.y0 <= label.y0 and label.y1 <= box.y1, (
                text.get_text()
            )
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
        for i, a in enumerate(boxes):
            for j in range(i + 1, len(boxes)):
                assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    finally:
        plt.close(fig)


def test_a_shard_that_holds_table_rows_is_not_called_empty(caplog):
    """examples/recsys.toml keeps one dense slice (the bias) on shard 0 and half of
    its table rows on shard 1: no shard there is empty; a dense model with more
    shards than slices still is warned of."""
    from psfw.jobs.config import load_config, parse_config
    from psfw.jobs.job import build_job, warn_empty_shards

    from helpers import EXAMPLES

    warn_empty_shards(build_job(load_config(EXAMPLES / "recsys.toml")))
    assert "holds nothing" not in caplog.text and "hold nothing" not in caplog.text, caplog.text
    dense = parse_config({"model": {"name": "mlp", "hidden": [4]}, "cluster": {"servers": 8}}, source="dense.toml")
    warn_empty_shards(build_job(dense))
    assert "dense.toml: cluster.servers is 8 but the model has only 4 slices: shards 4-7 hold nothing" in caplog.text


def test_net_json_and_the_picture_carry_each_shards_table_rows(tmp_path):
    """Each shard of the recommendation example shows its dense bytes and the table
    rows the routing gives it; the rows of all shards add up to the tables'."""
    from psfw.compute.netgraph import shard_label
    from psfw.jobs.config import load_config
    from psfw.jobs.job import build_job

    from helpers import EXAMPLES

    job = build_job(load_config(EXAMPLES / "recsys.toml"))
    outputs.write_net(tmp_path, job.model.layers, job.layout, job.table_declaration())
    tables = json.loads((tmp_path / "partition.json").read_text())["tables"]
    assert {t["name"]: sum(t["shard_rows"]) for t in tables} == {n: s.rows for n, s in job.model.tables.items()}
    nodes = {n["id"]: n for n in json.loads((tmp_path / "net.json").read_text())["nodes"]}
    shards = [nodes[f"shard:{i}"] for i in range(2)]
    for name, spec in job.model.tables.items():
        held = [s["table_rows"][name] for s in shards]
        assert sum(held) == spec.rows and all(n > spec.rows // 3 for n in held), held
    for shard in shards:
        rows = sum(shard["table_rows"].values())
        assert shard["table_bytes"] == rows * 17 * 4  # float32 rows 17 wide (dim 16 and a linear term)
        assert f"+ {rows:,} table rows ({rows * 17 * 4 / 1e6:.2f} MB)" in shard_label(shard)
    assert (tmp_path / "net.png").stat().st_size > 0


def test_an_unbounded_table_is_held_by_id_on_every_shard():
    from psfw.compute.netgraph import shard_label

    layout = plan_layout({"bias": ((1,), "float32")}, 2, 1, 1 << 20)
    partition = {**layout.to_json(), "tables": [{"name": "ids", "rows": None, "dim": 8, "shard_rows": None}]}
    graph = net_graph(default_layers(["bias"]), partition)
    assert [graph.edges["table:ids", f"shard:{i}"]["rows"] for i in range(2)] == ["by id", "by id"]
    assert shard_label(graph.nodes["shard:1"]) == "0 B dense\n+ rows by id"
