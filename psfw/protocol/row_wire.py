"""Embedding-table rows on the wire: ``RowBlock`` messages, in pieces that fit.

A table's rows travel as ids (little-endian int64) and values (little-endian
float32, ids x dim), cut into pieces of at most ``PIECE_BYTES`` so that no message
nears gRPC's limit; the pieces of a stream's messages are put back together in
order (``RowCollector``), and every piece is checked on the way in: a malformed
one is INVALID_ARGUMENT, naming the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
import numpy as np

from psfw.base.errors import WireError
from psfw.proto import ps_pb2 as pb
from psfw.protocol.messages import RowBlock, TableIds, TableRows

PIECE_BYTES = 1 << 20
MAX_ROW_BYTES = 1 << 30  # of one request's rows: far beyond a step's, and bounds a bad one
_ID, _VALUE = np.dtype("<i8"), np.dtype("<f4")


def _bad(message: str) -> WireError:
    return WireError(grpc.StatusCode.INVALID_ARGUMENT, message)


def row_pieces(rows: Mapping[str, RowBlock], limit: int = PIECE_BYTES) -> list[list[pb.RowBlock]]:
    """``rows`` as RowBlock messages, grouped so that each group holds at most about
    ``limit`` bytes (one group per message of a stream)."""
    groups: list[list[pb.RowBlock]] = [[]]
    room = limit
    for table, block in rows.items():
        ids = np.asarray(block.ids, _ID)
        values = np.asarray(block.values, _VALUE)
        dim = values.shape[1] if values.ndim == 2 else 0
        per_row = _ID.itemsize + dim * _VALUE.itemsize
        start = 0
        while start < len(ids) or (start == 0 and not len(ids)):
            if room < per_row and groups[-1]:
                groups.append([])
                room = limit
            count = max(1, min(len(ids) - start, room // per_row))
            part = slice(start, start + count)
            groups[-1].append(pb.RowBlock(table=table, ids=ids[part].tobytes(), values=values[part].tobytes(), dim=dim))
            room -= count * per_row
            start += count
            if not len(ids):
                break
    return groups if groups[0] else []


def pull_blocks(pull: Mapping[str, np.ndarray]) -> list[pb.RowBlock]:
    """The rows wanted, by table, as id-only RowBlock messages (one message: a Get
    of rows asks for at most ``PULL_IDS`` ids per table, see ``fetch_rows``)."""
    return [pb.RowBlock(table=t, ids=np.asarray(ids, _ID).tobytes()) for t, ids in pull.items()]


PULL_IDS = PIECE_BYTES // _ID.itemsize  # ids per piece of a pull


def row_messages(push: TableRows, pull: TableIds) -> list[tuple[list[pb.RowBlock], list[pb.RowBlock]]]:
    """An Update's table rows, message by message: the push and pull pieces of each
    (the first go in the header's message); at least one (empty) entry."""
    pushes = row_pieces(push)
    empty = {t: np.zeros((0, 0), np.float32) for t in pull}
    pulls = row_pieces({t: RowBlock(np.asarray(ids, _ID), empty[t]) for t, ids in pull.items()})
    count = max(len(pushes), len(pulls), 1)
    return [(pushes[i] if i < len(pushes) else [], pulls[i] if i < len(pulls) else []) for i in range(count)]


def as_rows(rows: TableRows) -> dict[str, RowBlock]:
    """Rows as the wire delivers them (int64 ids, float32 values), whatever a caller
    in this process handed in: every transport takes the same input alike."""
    out = {}
    for table, block in rows.items():
        ids, values = np.asarray(block.ids), np.asarray(block.values)
        if ids.dtype.kind not in "iu" or values.dtype.kind != "f":
            raise _bad(f"table {table}: ids must be integers and rows floats, got {ids.dtype} and {values.dtype}")
        out[table] = RowBlock(ids.astype(_ID, copy=False), values.astype(_VALUE, copy=False))
    return out


def as_ids(pull: TableIds) -> dict[str, np.ndarray]:
    """Ids wanted as the wire delivers them (int64)."""
    out = {}
    for table, ids in pull.items():
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise _bad(f"table {table}: ids must be integers, got {ids.dtype}")
        out[table] = ids.astype(_ID, copy=False)
    return out


class RowCollector:
    """Puts the pieces of every table's rows back together, checking each piece:
    ids a whole number of int64, values ids x dim float32, one dim per table; more
    than ``max_bytes`` in all is refused."""

    def __init__(self, max_bytes: int = MAX_ROW_BYTES):
        self.max_bytes, self.total = max_bytes, 0
        self._ids: dict[str, list[np.ndarray]] = {}
        self._values: dict[str, list[np.ndarray]] = {}
        self._dims: dict[str, int] = {}

    def add(self, pieces: Iterable[pb.RowBlock], ids_only: bool = False) -> None:
        for piece in pieces:
            table = piece.table
            if not table or len(table) > 100:
                raise _bad("a RowBlock names no table (or a name over 100 characters)")
            self.total += len(piece.ids) + len(piece.values)
            if self.total > self.max_bytes:
                raise _bad(f"the request's table rows exceed {self.max_bytes} bytes: send fewer rows per step")
            if len(piece.ids) % _ID.itemsize:
                raise _bad(f"table {table}: {len(piece.ids)} bytes of ids are not whole int64 ids")
            ids = np.frombuffer(piece.ids, _ID)
            dim = 0 if ids_only else piece.dim
            if self._dims.setdefault(table, dim) != dim:
                raise _bad(f"table {table}: rows of width {dim} and {self._dims[table]} in one request")
            if ids_only and piece.values:
                raise _bad(f"table {table}: a pull carries ids only, not values")
            if len(piece.values) != len(ids) * dim * _VALUE.itemsize:
                raise _bad(f"table {table}: {len(piece.values)} bytes of values for {len(ids)} rows of {dim} float32")
            self._ids.setdefault(table, []).append(ids)
            if not ids_only:
                self._values.setdefault(table, []).append(np.frombuffer(piece.values, _VALUE).reshape(len(ids), dim))

    def ids(self) -> dict[str, np.ndarray]:
        """The ids wanted, by table (a pull)."""
        return {t: parts[0] if len(parts) == 1 else np.concatenate(parts) for t, parts in self._ids.items()}

    def rows(self) -> dict[str, RowBlock]:
        """The rows, by table."""
        out = {}
        for table, parts in self._ids.items():
            values = self._values[table]
            ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out[table] = RowBlock(ids, values[0] if len(values) == 1 else np.concatenate(values))
        return out
