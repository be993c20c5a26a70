"""Test configuration shared by the whole suite.

* ``TRITON_INTERPRET=1`` is set before anything imports triton when no CUDA
  device is present, so Triton kernels run (exactly, slowly) on CPU tensors.
* ``NUMBA_NUM_THREADS=1`` keeps two pytest-xdist workers from oversubscribing
  the cores.
* hypothesis runs without deadlines (no test asserts a timing).
* Markers: ``slow``, ``gpu`` (needs real hardware; skipped otherwise),
  ``notebook`` (executes a book chapter).
"""

import os
import shutil
import subprocess


def _cuda_visible() -> bool:
    # No torch import here: probing with nvidia-smi keeps torch out of
    # the processes that do not need it.
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0


if not _cuda_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# No test may depend on how loaded the machine is: hypothesis's per-example
# deadline and its "too slow" health check are timing assertions, so both
# are off for the whole suite (numba's first call compiles, and another
# process may hold every core).
settings.register_profile(
    "nqlib", deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("nqlib")


def pytest_collection_modifyitems(config, items):
    if _cuda_visible():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def load_benchmark():
    """A loader of the scripts in ``benchmarks/`` as modules:
    ``load_benchmark("trellis")`` is ``benchmarks/trellis.py`` (its folder
    on ``sys.path`` while it loads, for ``_harness``)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name):
        sys.path.insert(0, str(folder))
        try:
            spec = importlib.util.spec_from_file_location(
                f"{name}_bench", folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(folder))
        return module

    return load
