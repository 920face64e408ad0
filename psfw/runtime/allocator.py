"""glibc malloc settings for psfw's OS processes.

Tensors travel and are updated in pieces of about 1 MiB (slices, chunks). With
glibc's defaults such a buffer is often mapped fresh from the kernel (a page fault
on every first touch of every page) and the heap is trimmed back after each free,
so the network path ran at about half speed; and with one malloc arena per thread,
memory freed by one thread (a request's buffers) was never reused by another (XLA's
outputs), so a large shard kept a second copy of its state that no thread used.

``tune_malloc`` sets, once, at the start of a ``psfw`` command:

- ``M_MMAP_THRESHOLD`` 32 MiB: buffers up to 32 MiB come from the heap and are reused;
- ``M_TRIM_THRESHOLD`` 256 MiB: up to 256 MiB freed at the heap's top stays mapped;
- ``M_ARENA_MAX`` 1: one heap for all threads, so freed buffers are reused.

It changes nothing when any ``MALLOC_*`` variable is set (the user's settings win)
or the C library is not glibc. ``psfw bench --transfer`` and ``--memory`` show the
effect (see docs/performance.md).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20), (M_ARENA_MAX, 1))


def tune_malloc() -> bool:
    """Apply SETTINGS to this process's glibc malloc; returns whether it did."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
