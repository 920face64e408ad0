"""One process's shared-memory region for all its shards on this host.

It holds the job's whole parameters three times, each at a 64-byte boundary: the
step's gradient sums, which the stub adds up there as its workers report
(``gradients``), and two areas of fresh values that the Updates take by turns
(``values``: the answer to the Update of step ``s`` goes to area ``(s + 1) % 2``).
Every shard reads its slices' sums where they lie and writes its answer into the
parameters themselves, so the stub hands the whole parameters to JAX as they are:
nothing is copied on the stub's side.

The turns are what make that safe. The values published after step ``s`` are
written over only by the answer to the Update of step ``s + 2``, which is sent
once every local worker has reported step ``s + 2``, computed from the next
values: no worker reads them any more. A reader that keeps values longer (the
evaluation) copies them (``ParamCache``).
"""

from __future__ import annotations

import numpy as np

from psfw.proto import ps_pb2 as pb
from psfw.protocol.layout import Layout, SliceKey
from psfw.protocol.shm import Region, aligned
from psfw.protocol.wire import slice_views

AREAS = 3  # the gradient sums, then two areas of values


class StepRegion:
    """The region and the whole parameters laid out in it (see the module). The
    file is made when the first transport takes the region (``acquire``), so a
    process whose shards are all elsewhere makes none."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._offsets, position = {}, 0
        for name in sorted(layout.params):
            self._offsets[name] = position
            position += aligned(layout.params[name].nbytes)
        self.area = position
        self.region: Region | None = None
        self._areas: list[dict[str, np.ndarray]] = []
        self._slices: list[dict[SliceKey, np.ndarray]] = []
        self._users = 0
        self._failed: OSError | None = None

    def _open(self) -> None:
        if self._failed is not None:  # tried once: /dev/shm cannot hold it
            raise self._failed
        try:
            self.region = Region.create(AREAS * self.area)
        except OSError as err:
            self._failed = err
            raise
        for area in range(AREAS):
            start = area * self.area
            whole = {
                name: self.region.view(start + self._offsets[name], np.dtype(spec.dtype), spec.shape)
                for name, spec in self.layout.params.items()
            }
            self._areas.append(whole)
            self._slices.append(slice_views(self.layout, whole))

    @property
    def name(self) -> str:
        return self.region.name if self.region is not None else ""

    def gradients(self) -> dict[str, np.ndarray]:
        """Where a step's gradient sums go, as whole parameters."""
        return self._areas[0]

    def values(self, step: int) -> tuple[dict[str, np.ndarray], dict[SliceKey, np.ndarray]]:
        """Where the answer to the Update of ``step`` goes: whole parameters, and the
        flat view of each slice inside them."""
        turn = 1 + (step + 1) % 2
        return self._areas[turn], self._slices[turn]

    def gradient_slot(self, key: SliceKey) -> np.ndarray:
        """The flat place of one slice's gradient sum."""
        return self._slices[0][key]

    def values_slot(self, step: int, key: SliceKey) -> np.ndarray:
        return self.values(step)[1][key]

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where ``array`` lies in the region (None: elsewhere)."""
        return self.region.offset_of(array)

    def slots(
        self, keys: list[SliceKey], step: int, grads, into: dict[SliceKey, np.ndarray] | None
    ) -> tuple[list[pb.ShmSlot], dict[SliceKey, np.ndarray], dict[SliceKey, np.ndarray]]:
        """Where each slice of ``keys`` has its gradient sum and where its answer
        goes (``ShmSlot``s): the stub's own buffers where they lie in the region
        (nothing is copied), else places of the region, filled here (the gradients)
        and read back by the caller. Returns the slots, the answer's places that are
        the caller's (``into``), and those to copy the answer from."""
        slots, values, to_read = [], {}, {}
        for key in keys:
            grad = grads[key]
            at = self.offset_of(grad)
            if at is None:  # not added up in the region: placed there now
                place = self.gradient_slot(key)
                np.copyto(place, np.asarray(grad).reshape(place.shape))
                at = self.offset_of(place)
            target = (into or {}).get(key)
            answer_at = None if target is None else self.offset_of(target)
            if answer_at is None:
                place = self.values_slot(step, key)
                answer_at, to_read[key] = self.offset_of(place), place
            else:
                values[key] = target
            slots.append(pb.ShmSlot(key=key[0], slice=key[1], grads=at, values=answer_at))
        return slots, values, to_read

    def acquire(self) -> StepRegion:
        """One more transport uses the region (made now if it is the first; OSError:
        /dev/shm cannot hold it)."""
        if self.region is None:
            self._open()
        self._users += 1
        return self

    def release(self) -> None:
        """A transport is done with the region: the last one closes it (the file
        goes at once; the mapping once no array views it any more)."""
        self._users -= 1
        if self._users <= 0 and self.region is not None:
            self.region.close()


__all__ = ["StepRegion"]
