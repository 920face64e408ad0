"""Where every parameter lives: its slices, the shard of each slice, its owner.

A parameter larger than ``slice_bytes`` is cut into near-equal contiguous ranges of
its flattened values (SINGA's ``Slice``); all slices are then placed largest first on
the shard holding the fewest bytes so far (``PartitionSlices``), which balances bytes
across shards. Owners are the workers of group 0, also balanced by bytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

SliceKey = tuple[str, int]  # (parameter name, slice index)


class SliceSpec(NamedTuple):
    key: str
    index: int
    start: int  # first element in the flattened parameter
    stop: int
    shard: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class ParamSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: str
    owner: int  # worker index in group 0
    slices: tuple[SliceSpec, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class Layout(NamedTuple):
    params: dict[str, ParamSpec]  # in tree order
    shards: int

    def shard_slices(self, shard: int) -> list[SliceSpec]:
        return [s for p in self.params.values() for s in p.slices if s.shard == shard]

    def shard_bytes(self) -> list[int]:
        totals = [0] * self.shards
        for p in self.params.values():
            item = np.dtype(p.dtype).itemsize
            for s in p.slices:
                totals[s.shard] += s.size * item
        return totals

    def owned_by(self, worker: int) -> list[str]:
        return [p.name for p in self.params.values() if p.owner == worker]

    def slice_dtype_shape(self, key: SliceKey) -> tuple[np.dtype, tuple[int, ...]]:
        spec = self.params[key[0]]
        s = spec.slices[key[1]]
        return np.dtype(spec.dtype), (s.size,)

    def to_json(self) -> dict:
        """The partition as plain JSON: owner and slices of every parameter."""
        return {
            "shards": self.shards,
            "shard_bytes": self.shard_bytes(),
            "params": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "dtype": p.dtype,
                    "bytes": p.nbytes,
                    "owner_worker": p.owner,
                    "slices": [
                        {"index": s.index, "start": s.start, "stop": s.stop, "shard": s.shard} for s in p.slices
                    ],
                }
                for p in self.params.values()
            ],
        }


def _ranges(size: int, parts: int) -> list[tuple[int, int]]:
    bounds = [size * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def plan_layout(shapes: dict[str, tuple[tuple[int, ...], str]], shards: int, workers: int, slice_bytes: int) -> Layout:
    """Slice, place and assign owners for parameters given as ``{name: (shape, dtype)}``.

    >>> plan_layout({"w": ((4, 4), "float32")}, shards=2, workers=1, slice_bytes=32).shard_bytes()
    [32, 32]
    """
    if shards < 1 or workers < 1 or slice_bytes < 1:
        raise ValueError("shards, workers and slice_bytes must all be at least 1")
    cuts: dict[str, list[tuple[int, int]]] = {}
    for name, (shape, dtype) in shapes.items():
        size = math.prod(shape)
        item = np.dtype(dtype).itemsize
        parts = max(1, min(size, math.ceil(size * item / slice_bytes)))
        cuts[name] = _ranges(size, parts)

    # Largest first onto the lightest shard; ties broken by name and index so that
    # every worker process computes the same placement.
    order = sorted(
        ((hi - lo) * np.dtype(shapes[n][1]).itemsize, n, i) for n, rs in cuts.items() for i, (lo, hi) in enumerate(rs)
    )
    order.sort(key=lambda t: (-t[0], t[1], t[2]))
    load = [0] * shards
    placed: dict[SliceKey, int] = {}
    for nbytes, name, index in order:
        shard = min(range(shards), key=lambda s: (load[s], s))
        load[shard] += nbytes
        placed[(name, index)] = shard

    by_size = sorted(shapes, key=lambda n: (-math.prod(shapes[n][0]) * np.dtype(shapes[n][1]).itemsize, n))
    owned = [0] * workers
    owners: dict[str, int] = {}
    for name in by_size:
        worker = min(range(workers), key=lambda w: (owned[w], w))
        owned[worker] += math.prod(shapes[name][0]) * np.dtype(shapes[name][1]).itemsize
        owners[name] = worker

    params = {}
    for name, (shape, dtype) in shapes.items():
        slices = tuple(SliceSpec(name, i, lo, hi, placed[(name, i)]) for i, (lo, hi) in enumerate(cuts[name]))
        params[name] = ParamSpec(name, tuple(int(d) for d in shape), str(np.dtype(dtype)), owners[name], slices)
    return Layout(params, shards)
