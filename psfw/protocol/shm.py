"""Shared memory between a stub and a shard process on the same host.

A stub's process makes one region (a file in /dev/shm) for all its shards on this
host (``psfw.runtime.step_region`` lays it out). An Update then carries only the
region's name and, per slice, where in it the gradients lie and where the fresh
values go (``ShmSlot``): the shard reads the gradients in place and writes the
values there before it answers. The offsets are the stub's to choose and the
shard's to check (``Region.view`` refuses one outside the region or off the
element size); at 64-byte boundaries JAX adopts the memory without copying it.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
NAME = re.compile(r"^psfw-(\d+)-[0-9a-f]{32}$")
ALIGN = 64


def host_id() -> str:
    """Equal for two processes exactly when they can share /dev/shm and are on the
    same network (a different network namespace counts as another host)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm, net = os.stat(SHM_DIR), os.stat("/proc/self/ns/net")
    except OSError:
        return ""
    return f"{boot}:{shm.st_dev}:{shm.st_ino}:{net.st_ino}"


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the next 64-byte boundary."""
    return -(-nbytes // ALIGN) * ALIGN


class Region:
    """A mapped shared-memory file of ``size`` bytes."""

    def __init__(self, name: str, size: int, mapping: mmap.mmap, owner: bool, fd: int | None = None):
        self.name, self.size, self._map, self.owner = name, size, mapping, owner
        self.buffer = np.frombuffer(mapping, np.uint8)
        self.base = self.buffer.ctypes.data  # the address of byte 0 in this process
        self._fd = fd  # a shard's: it may write answers through the file
        self._closing = threading.Lock()  # a write (possibly in a thread) against close()

    @classmethod
    def create(cls, size: int) -> Region:
        """A new region for a stub (it unlinks it on close)."""
        _sweep_stale()
        name = f"psfw-{os.getpid()}-{uuid.uuid4().hex}"
        size = max(aligned(size), ALIGN)
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # reserve the pages now: a full /dev/shm fails here (OSError: use the network)
            # instead of killing a process with SIGBUS on its first write
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            (SHM_DIR / name).unlink(missing_ok=True)
            raise
        else:
            os.close(fd)
        return cls(name, size, mapping, owner=True)

    @classmethod
    def attach(cls, name: str) -> Region:
        """Map a stub's region (a shard); ValueError says what is wrong with it."""
        if not NAME.match(name):
            raise ValueError(f"{name!r} is not a psfw shared-memory region name")
        # never through a link, and only a plain file of this process's own user: a
        # file another user made could be shrunk under the mapping (SIGBUS) or be a
        # link to a file the shard must not write
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError(
                    f"region {name} is not a plain file of this shard's user (uid {os.geteuid()}): "
                    "run the stub and the shard as the same user, or use the network path"
                )
            if info.st_size < ALIGN or info.st_size % ALIGN:
                raise ValueError(f"region {name} holds {info.st_size} bytes, not a multiple of {ALIGN}")
            mapping = mmap.mmap(fd, info.st_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, info.st_size, mapping, owner=False, fd=fd)

    def _span(self, offset: int, dtype: np.dtype, count: int) -> int:
        """The byte length of ``count`` elements at ``offset``; ValueError when they
        do not lie inside the region on a boundary of their element size."""
        itemsize = np.dtype(dtype).itemsize
        nbytes = count * itemsize
        if offset < 0 or offset % itemsize or offset + nbytes > self.size:
            raise ValueError(
                f"{nbytes} bytes of {np.dtype(dtype).name} at offset {offset} do not lie inside region "
                f"{self.name} ({self.size} bytes) on a {itemsize}-byte boundary"
            )
        return nbytes

    def view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The array of ``dtype`` and ``shape`` that lies at ``offset`` (no copy)."""
        nbytes = self._span(offset, dtype, math.prod(shape))
        return self.buffer[offset : offset + nbytes].view(dtype).reshape(shape)

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where ``array`` (contiguous) lies in this region, or None: elsewhere."""
        offset = array.ctypes.data - self.base
        if not array.flags.c_contiguous or offset < 0 or offset + array.nbytes > self.size:
            return None
        return offset

    def write(self, offset: int, array: np.ndarray, through_file: bool = False) -> None:
        """Write ``array`` at ``offset`` (a shard's answer).

        ``through_file`` writes with pwrite instead of through the mapping: slower
        (a system call per slice), but the pages never enter this process's
        resident memory, so a large shard does not hold a second copy of its values
        (the region is the stub's buffer, counted there)."""
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # bfloat16 has no buffer format
        self._span(offset, array.dtype, array.size)
        with self._closing:  # a view or a duplicate of the fd: close() cannot pull either away mid-write
            buffer = self.buffer
            fd = os.dup(self._fd) if through_file and self._fd is not None else None
        if buffer is None:
            raise ValueError(f"region {self.name} is closed")
        if fd is None:
            buffer[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
            return
        try:
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._closing:
            self.buffer = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        try:
            self._map.close()
        except BufferError:
            return  # arrays still use it: the mapping goes when they do
        finally:
            if self.owner:
                (SHM_DIR / self.name).unlink(missing_ok=True)


class RegionCache:
    """The regions a shard has mapped, the most recently used ``capacity`` of them."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._regions: OrderedDict[str, Region] = OrderedDict()

    def get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            self._forget_removed()
            region = Region.attach(name)
            self._regions[name] = region
            while len(self._regions) > self.capacity:
                self._regions.popitem(last=False)[1].close()
        self._regions.move_to_end(name)
        return region

    def _forget_removed(self) -> None:
        """Unmap regions whose stub has closed (their file is gone): their memory is
        freed only once no process maps them."""
        for name in [n for n in self._regions if not (SHM_DIR / n).exists()]:
            self._regions.pop(name).close()

    def close(self) -> None:
        for region in self._regions.values():
            region.close()
        self._regions.clear()


def _sweep_stale() -> None:
    """Remove regions left by stubs that were killed (their process is gone)."""
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return
    for path in entries:
        match = NAME.match(path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            path.unlink(missing_ok=True)
