"""Shared memory between a stub and a shard process on the same host.

A stub creates one region per shard (a file in /dev/shm) holding two areas of the
shard's size: the gradients it sends and the fresh values it gets back. An Update
(or Get) then carries only the region's name; the shard reads the gradients in
place and writes the values back before it answers. Slices are laid out in sorted
(key, slice) order, each at a 64-byte boundary, so both sides compute the same
offsets and JAX can adopt the memory without copying it.
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

from psfw.protocol.layout import SliceKey

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


def slot_layout(specs: list[tuple[SliceKey, np.dtype, tuple[int, ...]]]) -> tuple[dict[SliceKey, int], int]:
    """Byte offset of every slice in an area, and the area's size."""
    offsets, position = {}, 0
    for key, dtype, shape in sorted(specs, key=lambda s: s[0]):
        offsets[key] = position
        position += -(-math.prod(shape) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return offsets, max(position, ALIGN)


class Region:
    """A mapped shared-memory file: the gradients area, then the values area."""

    def __init__(self, name: str, area: int, mapping: mmap.mmap, owner: bool, fd: int | None = None):
        self.name, self.area, self._map, self.owner = name, area, mapping, owner
        self.buffer = np.frombuffer(mapping, np.uint8)
        self._fd = fd  # a shard's: it may write the values area through the file
        self._closing = threading.Lock()  # a write (possibly in a thread) against close()

    @classmethod
    def create(cls, area: int) -> Region:
        """A new region for a stub (it unlinks it on close)."""
        _sweep_stale()
        name = f"psfw-{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # reserve the pages now: a full /dev/shm fails here (OSError: use the network)
            # instead of killing a process with SIGBUS on its first write
            os.posix_fallocate(fd, 0, 2 * area)
            mapping = mmap.mmap(fd, 2 * area)
        except OSError:
            os.close(fd)
            (SHM_DIR / name).unlink(missing_ok=True)
            raise
        else:
            os.close(fd)
        return cls(name, area, mapping, owner=True)

    @classmethod
    def attach(cls, name: str, area: int) -> Region:
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
            size = info.st_size
            if size != 2 * area:
                raise ValueError(
                    f"region {name} holds {size} bytes, the shard's slices need {2 * area}: the layouts differ"
                )
            mapping = mmap.mmap(fd, 2 * area)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, area, mapping, owner=False, fd=fd)

    def view(self, values: bool, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        start = (self.area if values else 0) + offset
        count = math.prod(shape)
        return self.buffer[start : start + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def write_values(self, offset: int, array: np.ndarray, through_file: bool = False) -> None:
        """Write ``array`` into the values area at ``offset`` (a shard's answer).

        ``through_file`` writes with pwrite instead of through the mapping: slower
        (a system call per slice), but the pages never enter this process's
        resident memory, so a large shard does not hold a second copy of its values
        (the region is the stub's buffer, counted there)."""
        start = self.area + offset
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        if start + len(data) > 2 * self.area:
            raise ValueError(f"{len(data)} bytes at {offset} overrun the values area of region {self.name}")
        with self._closing:  # a view or a duplicate of the fd: close() cannot pull either away mid-write
            buffer = self.buffer
            fd = os.dup(self._fd) if through_file and self._fd is not None else None
        if buffer is None:
            raise ValueError(f"region {self.name} is closed")
        if fd is None:
            buffer[start : start + len(data)] = np.frombuffer(data, np.uint8)
            return
        try:
            while data:
                written = os.pwrite(fd, data, start)
                data, start = data[written:], start + written
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

    def get(self, name: str, area: int) -> Region:
        region = self._regions.get(name)
        if region is None or region.area != area:
            self._forget_removed()
            region = Region.attach(name, area)
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
