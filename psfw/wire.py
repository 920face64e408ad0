"""Tensors on the wire: slices as raw little-endian bytes in chunks of about 1 MiB.

``encode_chunks`` packs slices into messages of at most ``chunk_bytes`` of data (small
slices share a message, large ones span several); ``Assembler`` checks every chunk
against what the receiver expects and rebuilds the arrays, without a copy when a
slice arrived in one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np

from psfw.layout import SliceKey
from psfw.proto import ps_pb2 as pb

CHUNK_BYTES = 1 << 20
DTYPES = ("float16", "float32", "float64")


class WireError(Exception):
    """A request or reply that does not match what the receiver expects."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def slice_name(key: SliceKey) -> str:
    return f"{key[0]}[{key[1]}]"


def wire_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a wire dtype name."""
    if name not in DTYPES:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return np.dtype(name).newbyteorder("<")


def encode_chunks(
    items: Iterable[tuple[str, int, np.ndarray]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[list[pb.Chunk]]:
    """Group ``(key, slice, array)`` items into lists of chunks of at most
    ``chunk_bytes`` of data each; every list becomes one message."""
    batch: list[pb.Chunk] = []
    room = chunk_bytes
    for key, index, array in items:
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        raw = memoryview(array.reshape(-1)).cast("B")
        dtype, shape = array.dtype.name, array.shape
        offset, total = 0, len(raw)
        while True:
            take = min(room, total - offset)
            if take == 0 and total > 0:
                yield batch
                batch, room = [], chunk_bytes
                continue
            batch.append(
                pb.Chunk(key=key, slice=index, dtype=dtype, shape=shape, offset=offset, data=raw[offset : offset + take].tobytes())
            )
            offset += take
            room -= take
            if offset >= total:
                break
    if batch:
        yield batch


Expect = Callable[[SliceKey], "tuple[np.dtype, tuple[int, ...]]"]


class Assembler:
    """Rebuilds slices from chunks that arrive in order, validating each one.

    ``expect(key)`` returns the dtype and shape the receiver holds for a slice and
    raises WireError(NOT_FOUND) for an unknown one; without it any supported dtype
    and shape is accepted (a Put of new parameters). ``max_bytes`` bounds the total.
    """

    def __init__(self, expect: Expect | None = None, max_bytes: int | None = None):
        self._expect = expect
        self._max_bytes = max_bytes
        self._total = 0
        self._specs: dict[SliceKey, tuple[np.dtype, tuple[int, ...], int]] = {}
        self._parts: dict[SliceKey, bytes | np.ndarray] = {}
        self._got: dict[SliceKey, int] = {}

    def add(self, chunk: pb.Chunk) -> None:
        key = (chunk.key, chunk.slice)
        name = slice_name(key)
        data = chunk.data
        spec = self._specs.get(key)
        if spec is None:
            spec = self._open(key, chunk)
        dtype, shape, nbytes = spec
        if chunk.dtype != dtype.name or tuple(chunk.shape) != shape:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunks of {name} disagree: {chunk.dtype}{list(chunk.shape)} after {dtype.name}{list(shape)}",
            )
        got = self._got[key]
        if chunk.offset != got:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk of {name} starts at byte {chunk.offset}, expected {got}: send each slice's chunks in order",
            )
        if got + len(data) > nbytes:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name} has {got + len(data)} bytes, more than its {dtype.name}{list(shape)} holds ({nbytes})",
            )
        self._total += len(data)
        if self._max_bytes is not None and self._total > self._max_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request carries more than the shard's limit of {self._max_bytes} bytes",
            )
        if got == 0 and len(data) == nbytes:
            self._parts[key] = data  # whole slice in one chunk: keep it, no copy
        else:
            if key not in self._parts:
                self._parts[key] = np.empty(nbytes, np.uint8)
            self._parts[key][got : got + len(data)] = np.frombuffer(data, np.uint8)
        self._got[key] = got + len(data)

    def _open(self, key: SliceKey, chunk: pb.Chunk) -> tuple[np.dtype, tuple[int, ...], int]:
        dtype = wire_dtype(chunk.dtype)
        shape = tuple(int(d) for d in chunk.shape)
        if any(d < 0 for d in shape):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{slice_name(key)} has a negative dimension {list(shape)}")
        if self._expect is not None:
            want_dtype, want_shape = self._expect(key)
            if dtype != want_dtype:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{slice_name(key)} is {want_dtype.name}, the request sent {dtype.name}",
                )
            if shape != tuple(want_shape):
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{slice_name(key)} has shape {list(want_shape)}, the request sent {list(shape)}",
                )
        spec = (dtype, shape, math.prod(shape) * dtype.itemsize)
        self._specs[key] = spec
        self._got[key] = 0
        return spec

    def finish(self) -> dict[SliceKey, np.ndarray]:
        """The complete arrays; raises WireError when a slice is missing bytes."""
        out = {}
        for key, (dtype, shape, nbytes) in self._specs.items():
            if self._got[key] != nbytes:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{slice_name(key)} is truncated: {self._got[key]} of {nbytes} bytes arrived",
                )
            buffer = self._parts.get(key, b"")
            out[key] = np.frombuffer(buffer, dtype).reshape(shape)
        return out
