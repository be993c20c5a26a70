"""Thread safety of the parallel (``parallel=True``) numba kernels.

numba runs ``prange`` loops on one of three threading layers. ``tbb`` and
``omp`` may be entered by several Python threads at once; ``workqueue``,
numba's fallback when neither TBB nor an OpenMP runtime can be loaded (the
usual case on macOS without ``tbb``), may not: a second concurrent launch
aborts the whole process ("Concurrent access has been detected").

The parallel kernels of :mod:`nqlib.kernels.cpu` are leaves -- called from
Python, never from other compiled code -- so every kernel module ends with
``guard_module(globals())``. On a thread-safe layer that changes nothing (the
kernels stay plain numba dispatchers). On ``workqueue`` it replaces each
parallel kernel of the module by a wrapper that holds one process-wide lock
for the duration of the call: nqlib calls made from several Python threads
then run their parallel loops one at a time, and give the same results as
sequential calls. A kernel module added later must end with the same line.
"""

from __future__ import annotations

import functools
import threading

from numba import njit

__all__ = ["KERNEL_LOCK", "THREADSAFE_LAYERS", "layer", "threadsafe", "guarded",
           "guard_module", "serial"]

#: held for the duration of a parallel kernel call when the threading layer
#: is not thread-safe (re-entrant: a guarded call may not deadlock itself)
KERNEL_LOCK = threading.RLock()
#: numba threading layers that several Python threads may enter at once
THREADSAFE_LAYERS = ("tbb", "omp")


@functools.cache
def layer() -> str:
    """The numba threading layer of this process: ``"tbb"``, ``"omp"`` or
    ``"workqueue"``. Selecting it starts numba's thread pool, as the first
    parallel kernel call would (``NUMBA_THREADING_LAYER`` is honoured)."""
    import numba
    from numba.np.ufunc import parallel

    parallel._launch_threads()
    return numba.threading_layer()


def threadsafe() -> bool:
    """Whether parallel kernels may be called from several threads at once
    (False when the layer cannot be determined)."""
    try:
        return layer() in THREADSAFE_LAYERS
    except Exception:  # an unforeseen numba: assume the worst
        return False


def guarded(kernel):
    """``kernel`` wrapped so that each call holds :data:`KERNEL_LOCK`.

    Compiled code that names the wrapper (a driver that calls a parallel
    kernel, compiled after :func:`guard_module` replaced it) sees the
    kernel itself: the wrapper carries the kernel's numba type. The driver
    is guarded too, so the lock is held around the whole call."""

    @functools.wraps(kernel)
    def call(*args, **kwargs):
        with KERNEL_LOCK:
            return kernel(*args, **kwargs)

    call.kernel = kernel
    from numba.core.registry import CPUDispatcher

    if isinstance(kernel, CPUDispatcher):
        from numba.core import types

        call._numba_type_ = types.Dispatcher(kernel)
    return call


def guard_module(namespace: dict) -> None:
    """Replace every parallel numba kernel in ``namespace`` (a module's
    ``globals()``) by :func:`guarded` when the threading layer is not
    thread-safe; do nothing otherwise."""
    if threadsafe():
        return
    from numba.core.registry import CPUDispatcher

    for name, obj in list(namespace.items()):
        if isinstance(obj, CPUDispatcher) and obj.targetoptions.get("parallel"):
            namespace[name] = guarded(obj)


@njit(cache=True, inline="always")
def serial(tasks):
    """Whether a parallel kernel runs its loop of ``tasks`` tasks in the
    calling thread (the same body, in ``range`` rather than ``prange``):
    when there is one task. Entering a ``prange`` loop wakes numba's thread
    pool even then -- about a microsecond on an idle machine, far more on a
    loaded one --, a visible part of a call on one row (a batch-1 layer).
    (The number of threads is not read here: numba's ``get_num_threads``
    in compiled code keeps a kernel out of the on-disk cache.)"""
    return tasks <= 1
