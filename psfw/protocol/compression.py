"""Gradients in bfloat16 on the network path, with error feedback.

``cluster.compression = "bf16"`` halves the bytes an Update carries over gRPC: each
float32 gradient slice travels as bfloat16 (float32's range, 8 bits of mantissa), and
what the rounding dropped is kept by the stub and added to the next step's gradient
of that slice (error feedback, as BytePS and 1-bit SGD do), so nothing is lost over
the steps: the sum of what was sent differs from the sum of the true gradients by
one step's rounding at most. The shard widens the slices back to float32 before its
update; the answers (the values) travel in full precision. Off by default: training
is then exactly single-process training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from psfw.protocol.layout import SliceKey

COMPRESSIONS = ("none", "bf16")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
WIDENED = {"bfloat16": (BFLOAT16, np.dtype("float32"))}  # wire name -> (wire dtype, the slice's own)


class ErrorFeedback:
    """One stub's residuals for the slices it sends one shard, in bfloat16."""

    def __init__(self) -> None:
        self._residuals: dict[SliceKey, np.ndarray] = {}

    def compressed(self, grads: Mapping[SliceKey, np.ndarray]) -> Compressed:
        """``grads`` as they will travel: each float32 slice rounded to bfloat16 with
        its residual added, once, when first read (a retried Update sends the same)."""
        return Compressed(grads, self)

    def compress(self, key: SliceKey, grad: np.ndarray) -> np.ndarray:
        if grad.dtype != np.float32:
            return grad
        residual = self._residuals.get(key)
        if residual is None or residual.shape != grad.shape:
            residual = self._residuals[key] = np.zeros(grad.shape, np.float32)
        np.add(grad, residual, out=residual)  # what should travel
        sent = residual.astype(BFLOAT16)
        residual -= sent.astype(np.float32)  # what did not fit: it travels with the next step
        if not math.isfinite(float(residual.sum(dtype=np.float64))):
            residual[:] = 0  # a non-finite gradient (the shard refuses or skips it) leaves no trace
        return sent


class Compressed(Mapping[SliceKey, np.ndarray]):
    """An Update's gradients as bfloat16, each slice compressed when first read."""

    def __init__(self, grads: Mapping[SliceKey, np.ndarray], feedback: ErrorFeedback):
        self._grads, self._feedback = grads, feedback
        self._sent: dict[SliceKey, np.ndarray] = {}

    def __getitem__(self, key: SliceKey) -> np.ndarray:
        sent = self._sent.get(key)
        if sent is None:
            sent = self._sent[key] = self._feedback.compress(key, np.asarray(self._grads[key]))
        return sent

    def __iter__(self) -> Iterator[SliceKey]:
        return iter(self._grads)

    def __len__(self) -> int:
        return len(self._grads)
