"""Tensors on the wire: slices as raw little-endian bytes in chunks of about 1 MiB.

The messages themselves are ``psfw.protocol.chunks``; here: the names and dtypes a
slice may have, aligned buffers, batches, and the ``Assembler``, which checks every
chunk against what the receiver expects (``check_slice``, which the in-process
transport applies too) and rebuilds the arrays, without a copy when a slice arrived
in one chunk; and the Update's header as a message and back.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.chunks import ALIGN, Chunk, ChunkedMessage
from psfw.protocol.compression import WIDENED
from psfw.protocol.layout import Layout, SliceKey
from psfw.protocol.messages import TableIds, TableRows, UpdateHeader

T = TypeVar("T")

DTYPES = ("float16", "bfloat16", "float32", "float64")


def slice_name(key: SliceKey) -> str:
    return f"{key[0]}[{key[1]}]"


MAX_NAME_CHARS = 512


def check_name(name: str) -> None:
    """A parameter name is printable text (``dense0/w``) of at most MAX_NAME_CHARS
    characters: it reaches logs, checkpoints and pictures."""
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"parameter name {shown!r} is not printable text of 1 to {MAX_NAME_CHARS} characters",
        )


def wire_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a wire dtype name."""
    if name not in DTYPES:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT, f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}"
        )
    return np.dtype(name).newbyteorder("<")


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | str, align: int = ALIGN) -> np.ndarray:
    """An uninitialized array whose data starts on an ``align``-byte boundary.

    JAX on CPU adopts such a buffer without copying it (``jax.device_put``), so a
    fresh buffer must be used for every step: JAX may still read the old one.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def batched(items: Iterable[T], nbytes: Callable[[T], int], limit: int) -> list[list[T]]:
    """``items`` in order, in batches of about ``limit`` bytes (a batch is closed
    once it reaches the limit; there is always at least one, maybe empty)."""
    batches: list[list[T]] = [[]]
    size = 0
    for item in items:
        if size >= limit:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += nbytes(item)
    return batches


async def encoded_ahead(batches: list[T], encode: Callable[[T, int], list[bytes]]) -> AsyncIterator[bytes]:
    """The messages of ``encode(batch, index)`` for every batch, each batch encoded in
    a thread while the caller sends the previous one's messages."""
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, encode, batches[0], 0)
    try:
        for index in range(len(batches)):
            messages = await pending
            if index + 1 < len(batches):
                pending = loop.run_in_executor(None, encode, batches[index + 1], index + 1)
            for message in messages:
                yield message
    finally:
        if not pending.done():
            pending.cancel()  # the caller left (a cancelled or failed RPC): its result is not wanted
        elif not pending.cancelled():
            pending.exception()  # retrieved, so that a failure nobody awaits is not logged


def param_buffers(layout: Layout, names: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[SliceKey, np.ndarray]]:
    """Fresh aligned arrays for whole parameters, and the flat view of each slice
    inside them (an ``into`` for the Assembler)."""
    params = {name: aligned_empty(layout.params[name].shape, layout.params[name].dtype) for name in names}
    return params, slice_views(layout, params)


def slice_views(layout: Layout, params: dict[str, np.ndarray]) -> dict[SliceKey, np.ndarray]:
    """The flat view of each slice of the whole parameters ``params``."""
    into = {}
    for name, value in params.items():
        flat = value.reshape(-1)
        for s in layout.params[name].slices:
            into[(name, s.index)] = flat[s.start : s.stop]
    return into


Expect = Callable[[SliceKey], "tuple[np.dtype, tuple[int, ...]]"]


def check_slice(
    key: SliceKey, dtype_name: str, shape: Iterable[int], expect: Expect | None, widen: bool = False
) -> tuple[np.dtype, tuple[int, ...], bool]:
    """The checks every slice of a request passes, whatever carries it (the
    Assembler's, the in-process transport's): a printable name, a dtype the wire
    takes, no negative dimension, and, with ``expect``, the dtype and shape the
    receiver holds (raising its WireError for a slice it does not hold). ``widen``:
    a float32 slice may come as bfloat16 (``psfw.protocol.compression``). Returns the
    dtype and shape as sent and whether the slice is to be widened."""
    check_name(key[0])
    narrow = WIDENED.get(dtype_name) if widen and expect is not None else None
    dtype = narrow[0] if narrow else wire_dtype(dtype_name)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{slice_name(key)} has a negative dimension {list(shape)}")
    if expect is not None:
        want_dtype, want_shape = expect(key)
        if narrow and want_dtype == narrow[0]:  # a bfloat16 parameter's own gradient: nothing to widen
            narrow = None
        if (narrow[1] if narrow else dtype) != want_dtype:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{slice_name(key)} is {want_dtype.name}, the request sent {dtype.name}",
            )
        if shape != tuple(want_shape):
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{slice_name(key)} has shape {list(want_shape)}, the request sent {list(shape)}",
            )
    return dtype, shape, narrow is not None


class Assembler:
    """Rebuilds slices from chunks that arrive in order, validating each one.

    ``expect(key)`` returns the dtype and shape the receiver holds for a slice and
    raises WireError(NOT_FOUND) for an unknown one; without it any supported dtype
    and shape is accepted (a Put of new parameters). ``max_bytes`` bounds the total.
    ``into`` maps slices to contiguous arrays that receive their bytes (for example
    views of a parameter's aligned buffer); other slices stay views of the messages,
    or, with ``keep``, are copied into aligned buffers of their own, which a receiver
    that keeps them (a Put) hands to JAX as they are, and which free the messages.
    ``widen``: a slice may arrive in a narrower wire dtype (bfloat16 for float32, see
    ``psfw.protocol.compression``); ``finish`` widens it to the expected dtype.
    """

    def __init__(
        self,
        expect: Expect | None = None,
        max_bytes: int | None = None,
        into: dict[SliceKey, np.ndarray] | None = None,
        keep: bool = False,
        widen: bool = False,
    ):
        self._expect = expect
        self._widen = widen
        self._widened: set[SliceKey] = set()
        self._keep = keep
        self._into = into or {}
        self._max_bytes = max_bytes
        self.total = 0  # bytes received so far
        self._declared = 0  # bytes the slices opened so far declare
        self._specs: dict[SliceKey, tuple[np.dtype, tuple[int, ...], int]] = {}
        self._parts: dict[SliceKey, bytes | np.ndarray] = {}
        self._got: dict[SliceKey, int] = {}
        self._whole: list[SliceKey] = []  # slices complete since ``ready`` was last asked

    def add_message(self, message: ChunkedMessage) -> Message:
        """Add every chunk of a message; returns its header."""
        if message.error:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, message.error)
        for chunk in message.chunks:
            self.add(chunk)
        return message.header

    def add(self, chunk: Chunk) -> None:
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
        self.total += len(data)
        if self._max_bytes is not None and self.total > self._max_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request carries more than the shard's limit of {self._max_bytes} bytes",
            )
        if key in self._into:
            self._parts.setdefault(key, self._into[key].reshape(-1).view(np.uint8))
            self._parts[key][got : got + len(data)] = np.frombuffer(data, np.uint8)
        elif got == 0 and len(data) == nbytes and (not self._keep or _adoptable(data)):
            self._parts[key] = data  # whole slice in one chunk: a view, no copy
        else:
            if key not in self._parts:
                self._parts[key] = aligned_empty((nbytes,), np.uint8)  # JAX can adopt it
            self._parts[key][got : got + len(data)] = np.frombuffer(data, np.uint8)
        self._got[key] = got + len(data)
        if self._got[key] == nbytes:
            self._whole.append(key)

    def _open(self, key: SliceKey, chunk: Chunk) -> tuple[np.dtype, tuple[int, ...], int]:
        dtype, shape, narrow = check_slice(key, chunk.dtype, chunk.shape, self._expect, self._widen)
        declared = self._declared + math.prod(shape) * dtype.itemsize
        if self._max_bytes is not None and declared > self._max_bytes:  # refused before anything is allocated
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{slice_name(key)} is {dtype.name}{list(shape)}: the request declares {declared} bytes, more "
                f"than the shard's limit of {self._max_bytes}",
            )
        self._declared = declared
        spec = (dtype, shape, math.prod(shape) * dtype.itemsize)
        target = self._into.get(key)
        if target is not None and (target.dtype != dtype or target.nbytes != spec[2]):
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{slice_name(key)} arrived as {dtype.name}{list(shape)}, expected {target.dtype.name}[{target.size}]",
            )
        self._specs[key] = spec
        self._got[key] = 0
        if narrow:
            self._widened.add(key)
        return spec

    def ready(self) -> list[tuple[SliceKey, np.ndarray]]:
        """The slices that became complete since the last call, in the order they
        did, as ``finish`` gives them (for a receiver that takes each slice as soon
        as it is whole: a pipelined Update)."""
        whole, self._whole = self._whole, []
        return [(key, self._array(key)) for key in whole]

    def finish(self) -> dict[SliceKey, np.ndarray]:
        """The complete arrays; raises WireError when a slice is missing bytes."""
        out = {}
        for key, (_, _, nbytes) in self._specs.items():
            if self._got[key] != nbytes:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{slice_name(key)} is truncated: {self._got[key]} of {nbytes} bytes arrived",
                )
            out[key] = self._array(key)
        return out

    def _array(self, key: SliceKey) -> np.ndarray:
        dtype, shape, _ = self._specs[key]
        out = self._into[key] if key in self._into else np.frombuffer(self._parts.get(key, b""), dtype).reshape(shape)
        return out.astype(WIDENED[dtype.name][1]) if key in self._widened else out


def _adoptable(data: memoryview | bytes) -> bool:
    """Whether a chunk's data may be kept as it lies: aligned and writable (a
    message the link read into an aligned buffer of its own), so JAX adopts it."""
    view = np.frombuffer(data, np.uint8)
    return view.flags.writeable and view.ctypes.data % ALIGN == 0


def update_request(header: UpdateHeader, shm: str = "", rows: tuple[list, list] = ([], [])) -> pb.UpdateRequest:
    """The Update's header as the gRPC message (``shm``: the region that carries the
    gradients, '' when they travel in the messages), with ``rows``, the first
    message's pieces of its table rows pushed and pulled (see ``row_messages``)."""
    return pb.UpdateRequest(
        group=header.group,
        step=header.step,
        process=header.process,
        workers=header.workers,
        rows=header.rows,
        workers_per_group=header.workers_per_group,
        worker_groups=header.worker_groups,
        staleness=header.staleness,
        group_processes=header.group_processes,
        epoch=header.epoch,
        checkpoint_every=header.checkpoint_every,
        metrics=header.metrics,
        job=header.job,
        wait_s=header.wait_s,
        shm=shm,
        push=rows[0],
        pull=rows[1],
        stop_at=header.stop_at,
        group_timeout_s=header.group_timeout_s,
        max_groups=header.max_groups,
        pipelined=header.pipelined,
    )


def update_header(request: pb.UpdateRequest, wait_s: float, push: TableRows, pull: TableIds) -> UpdateHeader:
    """The header of a received Update; ``wait_s``: the wait the shard grants it;
    ``push`` and ``pull``: the table rows of all its messages (``RowCollector``s')."""
    return UpdateHeader(
        group=request.group,
        step=request.step,
        process=request.process,
        workers=request.workers,
        rows=request.rows,
        workers_per_group=request.workers_per_group,
        worker_groups=request.worker_groups,
        staleness=request.staleness,
        group_processes=request.group_processes,
        epoch=request.epoch,
        checkpoint_every=request.checkpoint_every,
        metrics=dict(request.metrics),
        job=request.job,
        wait_s=wait_s,
        push=push,
        pull=pull,
        stop_at=request.stop_at,
        group_timeout_s=request.group_timeout_s,
        max_groups=request.max_groups,
        pipelined=request.pipelined,
    )
