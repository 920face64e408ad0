"""The rows of an ``.npy`` file, read when asked for, never held whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


class NpyFile:
    """An ``.npy`` file indexed by rows: ``f[rows]`` reads just those rows (a slice,
    or a 1-D array of row numbers; consecutive rows in one read), with ``os.preadv``
    into the result. Nothing is mapped into the process: a memory-mapped file would
    count every page a process touched in its resident memory, and the kernel maps
    whole large folios (up to 2 MB) of the page cache for each row read at random.
    A file in the other byte order is read in this machine's."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path} is an .npy file of format {version}: save it with numpy.save")
            self.shape, fortran, self.stored = header
            self.offset = f.tell()
        if fortran and len(self.shape) > 1:
            raise ValueError(f"{path} is stored in Fortran order: save it in C order (np.ascontiguousarray)")
        if self.stored.hasobject:
            raise ValueError(f"{path} holds objects, which psfw never unpickles: store numeric arrays")
        if not self.shape:
            raise ValueError(f"{path} holds a single value, not rows: save one row per example")
        self.dtype = self.stored.newbyteorder("=")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.stored.itemsize
        if self.path.stat().st_size < self.offset + self.row_bytes * self.shape[0]:
            raise ValueError(f"{path} is shorter than its header says ({list(self.shape)} {self.dtype}): save it again")
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __reduce__(self) -> Any:
        raise TypeError(f"an NpyFile holds an open file ({self.path}): open the file again instead of copying it")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows: Any) -> np.ndarray:
        n = len(self)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._native(self._run(start, max(0, stop - start)))
            rows = np.arange(start, stop, step)
        if isinstance(rows, int | np.integer):
            row = int(rows) + (n if rows < 0 else 0)
            if not 0 <= row < n:
                raise IndexError(f"row {rows} is out of range for {self.path} ({n} rows)")
            return self._native(self._run(row, 1))[0]
        index = np.asarray(rows)
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise IndexError(
                f"rows of {self.path} are picked by a slice or a 1-D array of row numbers, "
                f"not a {index.dtype} array of shape {list(index.shape)}"
            )
        index = index.astype(np.int64)
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"rows out of range for {self.path} ({n} rows)")
        out = np.empty((len(index), *self.shape[1:]), self.stored)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        start = 0
        for end in range(1, len(index) + 1):  # runs of consecutive rows: one read each
            if end == len(index) or ordered[end] != ordered[end - 1] + 1:
                out[order[start:end]] = self._run(int(ordered[start]), end - start)
                start = end
        return self._native(out)

    def _run(self, start: int, count: int) -> np.ndarray:
        """``count`` consecutive rows from ``start``, as stored."""
        out = np.empty((count, *self.shape[1:]), self.stored)
        view = memoryview(out.reshape(-1).view(np.uint8))
        offset, done = self.offset + start * self.row_bytes, 0
        while done < len(view):  # one read may return less (Linux: at most about 2 GiB)
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.path} ended before row {start + count}: was it cut short while training?")
            done += got
        return out

    def _native(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.stored == self.dtype else rows.astype(self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)
