"""A process's gradient sums: the workers' gradients of a step, added up.

Two ways, as the transports want them. Where the stub has buffers for its steps (a
shared region, ``StepBuffers``), ``GradientStage`` adds each worker's gradients into
them in the worker's own thread as it reports, so the sum is done when the last
worker is, while the others' threads overlap it. Elsewhere ``Sums`` adds a slice up
when a transport first reads it (the gRPC one: in its encoding thread, a batch at a
time while the earlier ones travel), or hands the parts over as they are to a
transport that fuses the sum into the shard's update.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import numpy as np

from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Parts


class GradientStage:
    """Adds a step's worker gradients (whole parameters, by name) into ``targets``
    as the workers report them, from their threads. The first report of a step
    writes, the others add; a parameter at a time, each under its own lock, so two
    workers that report together work on different parameters. A report computed
    before a re-sync (``generation`` behind ``current()``) adds nothing."""

    def __init__(self, targets: dict[str, np.ndarray], current):
        self.targets = targets
        self._current = current  # the cache's generation now
        self._locks = {name: threading.Lock() for name in targets}
        self._steps: dict[str, tuple[int, int]] = {}  # what each target holds: (generation, step)

    def add(self, step: int, generation: int, grads: Mapping[str, np.ndarray]) -> bool:
        """Add one worker's gradients of ``step``; False: stale, nothing added."""
        for name, target in self.targets.items():
            with self._locks[name]:
                # checked under the lock: a report of the new generation that got here
                # first was made after the re-sync, so this one sees it too
                if generation != self._current():
                    return False
                value = np.asarray(grads[name]).reshape(target.shape)
                if self._steps.get(name) != (generation, step):
                    np.copyto(target, value)
                    self._steps[name] = (generation, step)
                else:
                    np.add(target, value, out=target)
        return True


class Sums(Mapping[SliceKey, np.ndarray]):
    """A process's gradient sums by slice, each added up (``add_up``, the one place
    where a process's workers' gradients are summed) when first read, into
    ``targets`` where it has the slice. With one worker and no target, a sum is the
    worker's own view. Reading one slice from one thread at a time is safe."""

    def __init__(self, parts: dict[SliceKey, Parts], targets: dict[SliceKey, np.ndarray]):
        self._parts, self._targets = parts, targets
        self._sums: dict[SliceKey, np.ndarray] = {}

    def __getitem__(self, key: SliceKey) -> np.ndarray:
        done = self._sums.get(key)
        if done is None:
            parts, target = self._parts[key], self._targets.get(key)
            done = self._sums[key] = parts[0] if len(parts) == 1 and target is None else add_up(parts, target)
        return done

    def __iter__(self) -> Iterator[SliceKey]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def add_up(parts: Parts, out: np.ndarray | None = None) -> np.ndarray:
    """The sum of ``parts``, written into ``out`` (a new array when None)."""
    if out is None:
        if len(parts) == 1:
            return parts[0].copy()
        out = np.add(parts[0], parts[1])
    elif len(parts) == 1:
        np.copyto(out, parts[0])
        return out
    else:
        np.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        np.add(out, part, out=out)
    return out


def shard_sums(clients: list, layout_slices: list, grads: list[dict[str, np.ndarray]], staged: dict | None) -> list:
    """A process's gradient sum of every slice, per shard (``layout_slices``: each
    shard's slices): the step's buffers' views where they are added up already
    (``staged``, from ``GradientStage``); else the workers' parts as they are for a
    transport that fuses the sum into the shard's update, and ``Sums`` for the others."""
    sums = []
    for client, slices in zip(clients, layout_slices, strict=True):
        keys = [(s.key, s.index) for s in slices]
        if staged is not None:
            sums.append({key: staged[key] for key in keys})
            continue
        parts = {key: tuple(g[s.key].reshape(-1)[s.start : s.stop] for g in grads) for key, s in zip(keys, slices)}
        sums.append(parts if client.capabilities.fuses_sum else Sums(parts, {}))
    return sums
