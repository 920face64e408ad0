"""Whole parameters from the slices the shards answer with, put together in one
jitted call (the stub's only copy of an in-process answer)."""

from __future__ import annotations

import jax

from psfw.protocol.layout import Layout, SliceKey


def whole_params(layout: Layout, slices: dict[SliceKey, jax.Array]) -> dict[str, jax.Array]:
    """Whole parameters from their slices (traced under jit: one XLA call)."""
    params = {}
    for name, spec in layout.params.items():
        parts = [slices[(name, s.index)] for s in spec.slices]
        flat = parts[0] if len(parts) == 1 else jax.numpy.concatenate(parts)
        params[name] = flat.reshape(spec.shape)
    return params
