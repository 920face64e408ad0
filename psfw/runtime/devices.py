"""Which local device each worker of a worker process computes on."""

from __future__ import annotations

from typing import Any

import jax


def device_name(device: Any) -> str:
    """``cpu:0``, ``gpu:1``: a device as the logs and results show it."""
    return f"{device.platform}:{device.id}"


def worker_devices(choice: str | list[int], workers: int) -> list[Any]:
    """One device per local worker: ``"auto"`` gives each its own local device in
    turn when the process sees several (and None, JAX's default, when it sees one);
    a list gives indices into ``jax.local_devices()``, used in turn. ValueError when
    an index is not a device this process sees."""
    local = jax.local_devices()
    if choice == "auto":
        return [None] * workers if len(local) == 1 else [local[i % len(local)] for i in range(workers)]
    missing = [i for i in choice if i >= len(local)]
    if missing:
        seen = ", ".join(device_name(d) for d in local)
        raise ValueError(
            f"device {missing[0]} does not exist: this process sees {len(local)} ({seen}); "
            'give indices below that, or "auto"'
        )
    return [local[choice[i % len(choice)]] for i in range(workers)]


def describe_devices(workers: list[int], devices: list[Any]) -> str:
    """``worker 0 on cpu:0, worker 1 on cpu:1`` ('' when all use JAX's default)."""
    if all(d is None for d in devices):
        return ""
    return ", ".join(
        f"worker {w} on {device_name(d) if d is not None else 'default'}" for w, d in zip(workers, devices)
    )
