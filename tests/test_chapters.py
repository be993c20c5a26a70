"""Execute every book chapter once, through jupyter-cache.

`jupyter-book build` (with ``execute_notebooks: cache``) then reuses these
outputs, so one execution serves both the test run and the HTML book.
jupyter-cache keys a notebook on its code cells only; since a change to nqlib
or to the scale knob must re-run the chapters, the cache is wiped whenever a
hash of ``nqlib/`` and ``NQBOOK_SCALE`` changes.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
KEY_FILE = ROOT / "_build" / ".jupyter_cache.key"


def _chapters():
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    files.append(node[key])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    paths = [ROOT / (f if f.endswith(".md") else f + ".md") for f in files]
    # Only notebooks (MyST with a kernelspec) are executed.
    return [p for p in paths if "kernelspec:" in p.read_text()[:600]]


def _library_key() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "nqlib").rglob("*")):
        if path.is_file() and path.suffix in {".py", ".npy", ".json"}:
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    h.update(os.environ.get("NQBOOK_SCALE", "ci").encode())
    return h.hexdigest()


@pytest.fixture(scope="session")
def cache():
    from jupyter_cache import get_cache

    key = _library_key()
    if CACHE.exists() and (not KEY_FILE.exists() or KEY_FILE.read_text() != key):
        shutil.rmtree(CACHE)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    KEY_FILE.write_text(key)
    return get_cache(str(CACHE))


@pytest.mark.notebook
@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_chapter_executes(path, cache):
    from jupyter_cache.executors import load_executor

    rec = cache.add_nb_to_project(
        str(path), read_data={"name": "myst_nb_md", "type": "plugin"}
    )
    result = load_executor("local-serial", cache).run_and_cache(
        filter_pks=[rec.pk], timeout=1800
    )
    record = cache.get_project_record(rec.pk)
    assert not result.errored, record.traceback
    assert not result.excepted, record.traceback
