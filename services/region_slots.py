"""Where an Update through shared memory finds its gradients and puts its answer.

The stub names its region and, per slice, two byte offsets in it (``ShmSlot``): the
gradient sum the shard reads in place and the place the fresh values go. Everything
is checked before the update is applied: a region the shard cannot map is
``NO_SHARED_MEMORY`` (the stub goes on over the network), a slot that names a slice
the shard does not hold, names one twice, or lies outside the region is
``INVALID_ARGUMENT``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
import numpy as np

from psfw.base.errors import Reason, WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.layout import SliceKey
from psfw.protocol.shm import Region, RegionCache


def no_shared_memory(shard: int, message: str) -> WireError:
    return WireError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"shard {shard} {message}; send the tensors over the network",
        Reason.NO_SHARED_MEMORY,
    )


def map_region(regions: RegionCache, shard: int, name: str) -> Region:
    """A stub's region, mapped (once, then from ``regions``)."""
    try:
        return regions.get(name)
    except (OSError, ValueError) as err:
        raise no_shared_memory(shard, f"cannot use shared-memory region {name}: {err}") from None


def region_slots(
    region: Region,
    shard: int,
    slots: Iterable[pb.ShmSlot],
    specs: Mapping[SliceKey, tuple[np.dtype, tuple[int, ...]]],
) -> tuple[dict[SliceKey, np.ndarray], dict[SliceKey, int]]:
    """The gradient sums the slots point at (views of the region) and the offsets
    where each slice's fresh values go."""
    grads: dict[SliceKey, np.ndarray] = {}
    values: dict[SliceKey, int] = {}
    for slot in slots:
        key = (slot.key, slot.slice)
        if key not in specs:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT, f"a shared-memory slot names {key}, which shard {shard} does not hold"
            )
        if key in grads:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"two shared-memory slots name {key}")
        dtype, shape = specs[key]
        try:
            grads[key] = region.view(slot.grads, dtype, shape)
            region.view(slot.values, dtype, shape)  # checked now: the answer must have a place
        except ValueError as err:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"the shared-memory slot of {key}: {err}") from None
        values[key] = slot.values
    if specs and not grads:
        raise no_shared_memory(
            shard, f"was named region {region.name} without the slices' places in it (a stub of an older psfw)"
        )
    return grads, values


__all__ = ["map_region", "no_shared_memory", "region_slots"]
