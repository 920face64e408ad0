"""The update kernel: a shard's server-side optimizer as jitted calls over its slices.

A group step's contributions arrive as parts (one array per process, or the tuple
of a process's workers' arrays when its transport fused the sum): the jitted update
adds them up, divides by the group's rows, applies the optax optimizer slice by
slice (every optimizer psfw offers is element-wise) and checks that the sum is
finite, all in one XLA call. A large shard goes a batch of slices at a time, each
batch updated in place (its buffers donated to XLA) unless a reader still holds it.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from psfw.compute.optimizers import build_optimizer
from psfw.protocol.layout import SliceKey
from psfw.protocol.messages import Parts
from psfw.protocol.wire import batched

UPDATE_BATCH_BYTES = 64 << 20


class PartlyApplied(RuntimeError):
    """An update failed after it had changed part of the values: the state cannot
    be trusted any more (``__cause__`` is the failure)."""


class UpdateKernel:
    """The optimizer ``spec`` (its JSON, see psfw.compute.optimizers) as jitted
    update functions; ValueError (or TypeError) for a spec that is not one."""

    def __init__(self, spec: str, update_batch_bytes: int = UPDATE_BATCH_BYTES):
        self.spec = spec
        self.opt: optax.GradientTransformation = build_optimizer(json.loads(spec))
        self.update_batch_bytes = update_batch_bytes
        update = _make_update(self.opt)
        # the same update, and with the old values and state donated (written over)
        self._variants = {False: jax.jit(update), True: jax.jit(update, donate_argnums=(1, 2))}
        self.compiled: set[bool] = set()  # the variants that have run: a first call compiles

    @property
    def name(self) -> str:
        return json.loads(self.spec).get("name", "")

    def init(self, value: jax.Array) -> Any:
        return self.opt.init(value)

    def state_shapes(self, value: jax.Array) -> Any:
        """The form of the optimizer state of ``value`` (shapes and dtypes, no data)."""
        return jax.eval_shape(self.opt.init, value)

    def first_nonfinite(self, sums: Mapping[SliceKey, Parts]) -> SliceKey | None:
        """The first slice whose parts hold a NaN or an Inf (None: all finite).
        Plain numpy: for a contribution checked on its own, in a thread."""
        return next((key for key, parts in sums.items() if not all(np.isfinite(p).all() for p in parts)), None)

    def run(self, in_place: bool, grads: dict, states: dict, values: dict, rows: np.float32) -> tuple:
        """One jitted call over one batch: new values, new states, whether finite."""
        out = self._variants[in_place](grads, states, values, rows)
        self.compiled.add(in_place)
        return out

    def apply_slice(self, parts: Parts, value: jax.Array, state: Any, rows: np.float32, in_place: bool) -> tuple:
        """One slice's update on its own (a pipelined step): ``(new value, new
        state, finite)``, as XLA computes them (``finite``, a scalar array, is read
        when it is needed); a sum that is not finite gives the old value and state
        back. Compiled once per shape and dtype, whichever slice it is."""
        values, states, finite = self.run(in_place, {"slice": parts}, {"slice": state}, {"slice": value}, rows)
        return values["slice"], states["slice"], finite

    def batches(self, specs: Mapping[SliceKey, tuple[np.dtype, tuple[int, ...]]]) -> list[list[SliceKey]]:
        """The slices in batches of about ``update_batch_bytes`` (a small shard: one)."""

        def nbytes(key: SliceKey) -> int:
            dtype, shape = specs[key]
            return dtype.itemsize * math.prod(shape)

        return [keys for keys in batched(specs, nbytes, self.update_batch_bytes) if keys]

    def apply(
        self,
        grads: dict[SliceKey, Parts],
        values: dict[SliceKey, jax.Array],
        states: dict[SliceKey, Any],
        rows: np.float32,
        batches: list[list[SliceKey]],
        in_place: Callable[[list[SliceKey]], bool],
    ) -> bool:
        """Apply the update to ``values`` and ``states`` (replaced in the dicts);
        returns False, having changed nothing, when the summed gradients are not all
        finite.

        One batch: one call, with the finite check fused. Several: a finite check over
        all batches first, then a batch at a time, each in place when ``in_place``
        says no reader holds it (a reader keeps the old buffers, the batch gets new
        ones), so a shard needs no second copy of its state. A non-finite sum makes
        the jitted update hand back the old values and state (written over
        themselves when donated), so an update in place can still be refused.
        Raises PartlyApplied when a failure left part of the values changed.
        """
        if len(batches) > 1 and not all(bool(_all_finite({k: grads[k] for k in keys})) for keys in batches):
            return False
        changed = False  # once a batch is replaced or donated, a failure cannot be taken back
        donated: list = []  # this batch's inputs, when given to XLA to write over
        try:
            for keys in batches:
                donate = in_place(keys)
                olds = ({k: states[k] for k in keys}, {k: values[k] for k in keys})
                donated = jax.tree.leaves(olds) if donate else []
                new_values, new_states, finite = self.run(donate, {k: grads[k] for k in keys}, *olds, rows)
                # the outputs replace the inputs either way: donated inputs are gone,
                # and a refused update's outputs are the old values and state
                values.update(new_values)
                states.update(new_states)
                if not finite:
                    if len(batches) > 1:
                        raise RuntimeError("a batch was not finite after the check over all batches")
                    return False  # a single batch: the values are the old ones
                changed = True
        except Exception as err:
            # an error before XLA ran (tracing, compiling) leaves donated inputs as they were
            if changed or any(leaf.is_deleted() for leaf in donated):
                raise PartlyApplied(f"an update failed after it had changed part of the values ({err!r})") from err
            raise
        return True


def references(array: Any) -> int:
    return sys.getrefcount(array)


# How many references ``references(values[key])`` sees when a shard's dict is the
# only holder (the count differs between Python versions): measured, not assumed.
_PROBE = {"probe": object()}
ONLY_THE_SHARD = references(_PROBE["probe"])


def unshared(values: dict[SliceKey, jax.Array], keys: list[SliceKey]) -> bool:
    """Whether no reader (an answer being sent, a Get, a checkpoint being written)
    holds the values of ``keys``: then they may be updated in place."""
    return all(references(values[k]) <= ONLY_THE_SHARD for k in keys)


@jax.jit
def _all_finite(parts: dict) -> jax.Array:
    """Whether the sums of every slice's parts are all finite."""
    sums = [functools.reduce(jax.numpy.add, ps) for ps in parts.values()]
    return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(s).all() for s in sums]))


def _make_update(opt: optax.GradientTransformation):
    def update(parts, states, params, rows):
        # the contributions' parts are added here, fused with the update by XLA
        sums = {key: functools.reduce(jax.numpy.add, ps) for key, ps in parts.items()}
        finite = jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(s).all() for s in sums.values()]))
        grads = jax.tree.map(lambda g: g / rows.astype(g.dtype), sums)
        updates = {}
        new_states = {}
        for key in params:  # one optimizer state per slice: every optimizer is element-wise
            updates[key], new_states[key] = opt.update(grads[key], states[key], params[key])
        # a non-finite sum changes nothing: the old values and state come out again
        # (fused into the same pass), which is what lets a donated update be refused
        keep = functools.partial(jax.tree.map, lambda new, old: jax.numpy.where(finite, new, old))
        return keep(optax.apply_updates(params, updates), params), keep(new_states, states), finite

    return update
