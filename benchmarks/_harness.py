"""Shared timing helpers for the scripts in benchmarks/.

Machines are shared and noisy, so every benchmark times nqlib *and* a reference
implementation in the same process, interleaved, and reports the ratio. Times
are the best of several repeats (the least-disturbed run).
"""

from __future__ import annotations

import os
import platform
import time


def best_time(fn, *args, repeat: int = 5, min_time: float = 0.05, **kwargs) -> float:
    """Best wall time in seconds of ``fn(*args, **kwargs)`` over ``repeat`` runs.

    Each run calls ``fn`` enough times to last at least ``min_time`` seconds;
    the result is per call. The first call (compilation, caches) is not timed.
    """
    fn(*args, **kwargs)
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or number >= 1 << 20:
            break
        number *= 2
    best = elapsed / number
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args, **kwargs)
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def machine_line() -> str:
    """One line describing where the numbers were taken."""
    threads = os.environ.get("NUMBA_NUM_THREADS", "default")
    return (f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, NUMBA_NUM_THREADS={threads}, "
            f"python {platform.python_version()}")


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print ``rows`` (dicts) as an aligned text table."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells))
              for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
