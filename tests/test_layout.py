import numpy as np
import pytest

from psfw.protocol.layout import plan_layout

pytestmark = pytest.mark.unit


def test_a_parameter_larger_than_the_slice_limit_is_split_over_shards():
    layout = plan_layout({"w": ((1000, 10), "float32")}, shards=4, workers=2, slice_bytes=10_000)
    spec = layout.params["w"]
    assert len(spec.slices) == 4
    assert {s.shard for s in spec.slices} == {0, 1, 2, 3}
    assert spec.slices[0].start == 0 and spec.slices[-1].stop == 10_000
    assert all(a.stop == b.start for a, b in zip(spec.slices, spec.slices[1:]))


def test_placement_balances_bytes_across_shards():
    shapes = {f"p{i}": ((int(n),), "float32") for i, n in enumerate(np.random.default_rng(0).integers(1, 5000, 40))}
    layout = plan_layout(shapes, shards=3, workers=2, slice_bytes=4096)
    loads = layout.shard_bytes()
    assert max(loads) - min(loads) <= 4096, loads


def test_every_parameter_has_exactly_one_owner_and_owners_are_balanced():
    shapes = {"a": ((100,), "float32"), "b": ((100,), "float32"), "c": ((10,), "float32")}
    layout = plan_layout(shapes, shards=1, workers=2, slice_bytes=1 << 20)
    owners = {n: p.owner for n, p in layout.params.items()}
    assert set(owners.values()) == {0, 1}
    assert sorted(layout.owned_by(0) + layout.owned_by(1)) == ["a", "b", "c"]


def test_placement_and_owners_do_not_depend_on_dict_order():
    shapes = {"w": ((64, 64), "float32"), "b": ((64,), "float32"), "v": ((64, 64), "float32")}
    first = plan_layout(shapes, 2, 3, 4096)
    second = plan_layout(dict(reversed(shapes.items())), 2, 3, 4096)
    assert all(first.params[n] == second.params[n] for n in shapes)


def test_layout_rejects_nonsense():
    with pytest.raises(ValueError):
        plan_layout({"w": ((4,), "float32")}, shards=0, workers=1, slice_bytes=16)
