"""Per-thread scratch buffers, kept from one call to the next.

A freshly allocated array of a few megabytes is fresh memory for the
operating system: every page of it faults on its first write, which on
some machines (virtual machines especially) costs more than the
arithmetic that fills it. The intermediate arrays of a hot path -- the
rotated activations of a :class:`~nqlib.nn.QuantLinear` forward pass, the
coded rows of activations quantized on every call -- therefore come from
:func:`scratch`: one buffer per thread, name and dtype, grown when needed and
reused by the next call, so that its pages fault once.

An array from :func:`scratch` is valid until the next :func:`scratch` call
with the same name and dtype in the same thread: it must never escape the function
that asked for it (neither returned nor kept). Buffers above
:data:`MAX_KEEP_BYTES` are not kept. :func:`release` (``nqlib.release_scratch``)
drops the calling thread's buffers; a thread's buffers go with the thread.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["MAX_KEEP_BYTES", "scratch", "release", "kept_bytes"]

#: the largest buffer kept per thread and name (larger ones are allocated
#: afresh on each call)
MAX_KEEP_BYTES = 64 << 20

_local = threading.local()


def scratch(name: str, shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` on this
    thread's buffer ``(name, dtype)`` (see the module's description for how
    long it is valid). Cheap when the buffer is large enough already: a
    slice and a reshape."""
    count = 1
    for s in shape:
        count *= s
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (name, dtype)
    buf = bufs.get(key)
    if buf is None or buf.shape[0] < count:
        dt = np.dtype(dtype)
        nbytes = int(count) * dt.itemsize
        if nbytes > MAX_KEEP_BYTES:
            return np.empty(shape, dt)
        # 64-byte aligned (a cache line), whatever numpy's own alignment
        raw = np.empty(nbytes + 64, np.uint8)
        start = -raw.ctypes.data % 64
        buf = bufs[key] = raw[start:start + nbytes].view(dt)
    return buf[:count].reshape(shape)


def release() -> None:
    """Drop the calling thread's scratch buffers (the memory that nqlib's
    CPU forward passes and activation quantizer keep from one call to the
    next; at most :data:`MAX_KEEP_BYTES` per buffer). They are made again
    when next needed."""
    _local.bufs = {}


def kept_bytes() -> int:
    """Bytes of the calling thread's buffers."""
    return sum(b.nbytes for b in getattr(_local, "bufs", {}).values())
